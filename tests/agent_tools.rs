//! The tool loop: a tool is called with schema-valid arguments, its result reaches the
//! model, the turn ends with a final answer within the step limit; failing, slow and
//! panicking tools each leave the agent healthy; tool_choice narrows the grammar; with
//! two tool steps a turn calls twice, then answers.

mod common;

use std::sync::{Arc, Mutex};

use common::*;

use troupe::agent::{
    tool_fn, AgentActor, AgentConfig, Ask, History, TokenLog, Tool, ToolChoice, CALL_CLOSE,
    CALL_OPEN,
};
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
    let (model, engine) = setup();
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

    // The token log is exactly what the model was fed and wrote, in order (its cache
    // holds all of it but the last token written). Read the call out of the model's own
    // words, independently of the tool plumbing: its sum is what the tool must answer.
    let (log, cached) = agent.ask(TokenLog).await.unwrap();
    assert_eq!(
        cached + 1,
        log.len(),
        "the cache holds the log but its last token"
    );
    let seen = model.tokenizer().decode(&log).unwrap();
    let asked = seen
        .rfind("What is 17 + 25?")
        .expect("the question is in the log");
    let call_at = asked
        + seen[asked..]
            .find(CALL_OPEN)
            .expect("the model wrote a call");
    let call_end = call_at + seen[call_at..].find(CALL_CLOSE).unwrap();
    let call: serde_json::Value =
        serde_json::from_str(&seen[call_at + CALL_OPEN.len()..call_end]).unwrap();
    assert_eq!(call["name"], "add", "{call}");
    let (a, b) = (
        call["arguments"]["a"].as_i64().unwrap(),
        call["arguments"]["b"].as_i64().unwrap(),
    );
    assert_eq!(
        run.result,
        (a + b).to_string(),
        "the tool answered {a} + {b}"
    );
    assert_eq!(
        calls.lock().unwrap().clone(),
        vec![AddArgs { a, b }],
        "the typed arguments deserialized: schema-valid"
    );

    // The next model call saw the tool message: after the call, the log holds the
    // result as a tool turn, then the assistant's turn whose tokens are the answer,
    // at the very end of the log.
    let tool_turn = format!("<|im_start|>tool\n{}<|im_end|>", a + b);
    let tool_at = call_end
        + seen[call_end..]
            .find(&tool_turn)
            .expect("the tool turn was fed");
    let answer_open = tool_at + seen[tool_at..].find("<|im_start|>assistant\n").unwrap();
    let answer = &seen[answer_open + "<|im_start|>assistant\n".len()..];
    assert!(
        !r.text.is_empty() && !r.text.starts_with(CALL_OPEN),
        "{:?}",
        r.text
    );
    assert_eq!(
        answer.trim_end_matches("<|im_end|>").trim_end(),
        r.text.trim_end(),
        "the answer's tokens come right after the prompt that held the tool result"
    );
    let h = agent.ask(History).await.unwrap();
    let tool_msg = h.iter().position(|m| m.role == Role::Tool).unwrap();
    assert_eq!(h[tool_msg].content, run.result);
    assert_eq!(h.last().unwrap().role, Role::Assistant);
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
        engine.clone(),
        tools(Arc::new(Mutex::new(Vec::new()))),
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown tool `nope`"), "{e}");
}

/// With `max_tool_steps: 2` a turn runs two calls, the second after seeing the first's
/// result, then must answer. The tool's first result asks for a second call, and a
/// few-shot example shows the default model that pattern (greedy: the same replies
/// every run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tool_steps_then_an_answer_in_one_turn() {
    use troupe::agent::{example_exchange, format_call};
    use troupe::model::Message;
    let (_, engine) = setup();
    let ran = Arc::new(Mutex::new(0usize));
    let step = {
        let ran = ran.clone();
        tool_fn(
            "step",
            "Does the next step of the job.",
            move |_: Nothing| {
                let ran = ran.clone();
                async move {
                    let mut n = ran.lock().unwrap();
                    *n += 1;
                    Ok(if *n == 1 {
                        "not done: call step again".to_string()
                    } else {
                        format!("done: the code is {}", 4000 + *n)
                    })
                }
            },
        )
    };
    // Two demonstrations of the pattern: call, "not done", call again, answer.
    let mut examples = Vec::new();
    for (job, code) in [("Do the job.", "1234"), ("Finish the task.", "5678")] {
        let mut e = example_exchange(
            job,
            "step",
            serde_json::json!({}),
            "not done: call step again",
            "",
        );
        e.pop();
        e.extend([
            Message::assistant(format_call("step", &serde_json::json!({}))),
            Message::tool(format!("done: the code is {code}")),
            Message::assistant(format!("The code is {code}.")),
        ]);
        examples.extend(e);
    }
    let agent = AgentActor::new(
        AgentConfig {
            tool_choice: ToolChoice::Required,
            max_tool_steps: 2,
            examples,
            // An answer names a code: while the tool says "not done" there is none.
            grammar: Some(troupe::grammar::Grammar::Regex(
                "The code is [0-9]{4}\\.".into(),
            )),
            ..AgentConfig::new(
                "job",
                "You do jobs with the step tool. Call step until it says done, then give the code.",
            )
        },
        engine,
        vec![step],
    )
    .unwrap()
    .spawn_agent();
    let r = agent.ask(Ask::new("Do the work.")).await.unwrap();
    assert_eq!(r.tool_runs.len(), 2, "{r:?}");
    assert_eq!(*ran.lock().unwrap(), 2, "both calls ran");
    assert!(r
        .tool_runs
        .iter()
        .all(|t| t.call.name == "step" && !t.failed));
    assert_eq!(r.tool_runs[1].result, "done: the code is 4002");
    // The turn ended with an answer after the step limit, taken from the second result.
    assert_eq!(r.text, "The code is 4002.");
    let h = agent.ask(History).await.unwrap();
    let turn: Vec<Role> = h[h.len() - 6..].iter().map(|m| m.role).collect();
    assert_eq!(
        turn,
        [
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Assistant,
            Role::Tool,
            Role::Assistant
        ]
    );
    assert_eq!(h[h.len() - 2].content, r.tool_runs[1].result);
    assert_eq!(h.last().unwrap().content, r.text);
}
