//! Tools from MCP servers, on the default model: the reference server
//! `@modelcontextprotocol/server-everything` (its tools listed, `echo` and `get-sum`
//! called through MCP), `@modelcontextprotocol/server-filesystem` rooted in a temp dir
//! (a file read, a search, a path outside the root refused and shown to the model as
//! a tool error), and a FastMCP server of this test (`tests/python/mcp_test_server.py`)
//! whose tools take nested objects and enums, sleep past the timeout, raise, return a
//! megabyte, exit mid-call and change the tool list. Every call is constrained to its
//! tool's `inputSchema`, so each validates against it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;

use troupe::agent::{
    example_exchange, AgentActor, AgentConfig, Ask, History, McpServerConfig, ToolChoice, ToolRun,
};
use troupe::engine::Engine;
use troupe::model::{Role, WeightsMode};

fn real_engine() -> Engine {
    Engine::serve(
        Arc::new(real(WeightsMode::Native)),
        engine_config(256, 8, usize::MAX),
    )
    .unwrap()
}

fn agent_with(servers: Vec<McpServerConfig>, system: &str) -> AgentConfig {
    AgentConfig {
        mcp_servers: servers,
        max_tokens: 64,
        max_tool_steps: 1,
        tool_timeout_secs: 20.0,
        // A short final answer: the tests are about the calls (and stay quick).
        grammar: Some(troupe::grammar::Grammar::Regex("Done\\.".into())),
        ..AgentConfig::new("mcp", system)
    }
}

/// One turn forced to call `tool`; its run.
async fn call(agent: &kameo::actor::ActorRef<AgentActor>, task: &str, tool: &str) -> ToolRun {
    let r = agent
        .ask(Ask::new(task).tool_choice(ToolChoice::Tool(tool.into())))
        .await
        .unwrap_or_else(|e| panic!("{task}: {e}"));
    assert!(!r.tool_runs.is_empty(), "{task}: no tool call ({})", r.text);
    let run = r.tool_runs[0].clone();
    assert_eq!(run.call.name, tool);
    run
}

/// Asserts that `args` validates against `schema`.
fn validates(schema: &serde_json::Value, args: &serde_json::Value) {
    let v = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = v.iter_errors(args).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{args} against {schema}: {errors:?}");
}

/// The tool's `inputSchema` as the server listed it.
async fn input_schema(server: &McpServerConfig, tool: &str) -> serde_json::Value {
    let engine = Engine::serve(Arc::new(tiny(WeightsMode::Native)), Default::default()).unwrap();
    let tools = troupe::agent::server_tools(std::slice::from_ref(server), &engine)
        .await
        .unwrap();
    let t = tools.iter().find(|t| t.remote_name() == tool).unwrap();
    t.input_schema().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_server_tools_are_listed_and_called_through_mcp() {
    let Some(bin) = mcp_server_bin("mcp-server-everything") else {
        return;
    };
    let server = McpServerConfig::stdio("everything", bin.to_str().unwrap(), &["stdio"]);
    let engine = real_engine();
    let agent = engine
        .spawn_agent(
            agent_with(vec![server.clone()], "You are a helpful assistant."),
            vec![],
        )
        .await
        .unwrap();
    let history = agent.ask(History).await.unwrap();
    let system = &history[0].content;
    for sig in ["- echo(message: string)", "- get-sum(a: number, b: number)"] {
        assert!(
            system.contains(sig),
            "{sig} not in the tools prompt:\n{system}"
        );
    }

    let echo = call(&agent, "Echo the word banana.", "echo").await;
    assert!(!echo.failed, "{echo:?}");
    let message = echo.call.arguments["message"].as_str().unwrap();
    assert_eq!(echo.result, format!("Echo: {message}"));

    let sum = call(&agent, "What is 2 + 3? Use get-sum.", "get-sum").await;
    assert!(!sum.failed, "{sum:?}");
    let (a, b) = (
        sum.call.arguments["a"].as_f64().unwrap(),
        sum.call.arguments["b"].as_f64().unwrap(),
    );
    assert!(
        sum.result.contains(&format!("{}", a + b)),
        "{a} + {b}: {}",
        sum.result
    );
    validates(&input_schema(&server, "get-sum").await, &sum.call.arguments);

    // An enum argument: the call names one of its values.
    let annotated = call(
        &agent,
        "Show me an annotated success message.",
        "get-annotated-message",
    )
    .await;
    validates(
        &input_schema(&server, "get-annotated-message").await,
        &annotated.call.arguments,
    );

    let history = agent.ask(History).await.unwrap();
    let tool_messages: Vec<&str> = history
        .iter()
        .filter(|m| m.role == Role::Tool)
        .map(|m| m.content.as_str())
        .collect();
    assert!(
        tool_messages.contains(&echo.result.as_str()),
        "{tool_messages:?}"
    );
    assert!(
        tool_messages.contains(&sum.result.as_str()),
        "{tool_messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_server_reads_and_searches_and_refuses_outside_its_root() {
    let Some(bin) = mcp_server_bin("mcp-server-filesystem") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("docs")).unwrap();
    std::fs::write(
        root.join("lisbon.txt"),
        "Lisbon is the capital of Portugal.\n",
    )
    .unwrap();
    std::fs::write(
        root.join("docs/oslo.txt"),
        "Oslo is the capital of Norway.\n",
    )
    .unwrap();
    let server = McpServerConfig {
        cwd: Some(root.clone()),
        ..McpServerConfig::stdio("fs", bin.to_str().unwrap(), &[root.to_str().unwrap()])
    };
    let engine = real_engine();
    let mut examples = example_exchange(
        "Read the file notes.md",
        "read_text_file",
        serde_json::json!({"path": "notes.md"}),
        "Buy milk.",
        "notes.md says: Buy milk.",
    );
    examples.extend(example_exchange(
        "Search the folder notes for todo.txt",
        "search_files",
        serde_json::json!({"path": "notes", "pattern": "todo.txt"}),
        "notes/todo.txt",
        "Found notes/todo.txt.",
    ));
    let config = AgentConfig {
        examples,
        tools: vec!["read_text_file".into(), "search_files".into()],
        ..agent_with(
            vec![server.clone()],
            "You answer questions about the files in the current folder.",
        )
    };
    let agent = engine.spawn_agent(config, vec![]).await.unwrap();

    let read = call(&agent, "Read the file lisbon.txt", "read_text_file").await;
    assert!(!read.failed, "{read:?}");
    assert!(read.result.contains("capital of Portugal"), "{read:?}");

    let search = call(
        &agent,
        "Search the folder docs for oslo.txt",
        "search_files",
    )
    .await;
    validates(
        &input_schema(&server, "search_files").await,
        &search.call.arguments,
    );
    assert!(!search.failed, "{search:?}");
    assert!(search.result.contains("oslo.txt"), "{search:?}");

    // Outside the root: the server refuses, the model sees the error, the turn ends
    // with an answer.
    let r = agent
        .ask(
            Ask::new("Read the file /etc/hostname")
                .tool_choice(ToolChoice::Tool("read_text_file".into())),
        )
        .await
        .unwrap();
    let outside = &r.tool_runs[0];
    let path = outside.call.arguments["path"].as_str().unwrap();
    assert!(
        !Path::new(path).starts_with(&root),
        "the model read inside the root: {path}"
    );
    assert!(outside.failed, "{outside:?}");
    assert!(
        outside.result.starts_with("error: ") && outside.result.contains("denied"),
        "{}",
        outside.result
    );
    assert!(!r.text.is_empty());
}

/// The FastMCP test server, with its marks file.
fn faults_server(py: &Path, marks: &Path) -> McpServerConfig {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/mcp_test_server.py");
    let mut s = McpServerConfig::stdio("faults", py.to_str().unwrap(), &[script.to_str().unwrap()]);
    s.env
        .insert("TROUPE_TEST_MARKS".into(), marks.to_str().unwrap().into());
    s
}

/// Reads the marks the server wrote, waiting for `want` (the server writes it
/// asynchronously, after troupe's side has moved on).
fn wait_for_mark(marks: &Path, want: &str) -> String {
    for _ in 0..200 {
        let text = std::fs::read_to_string(marks).unwrap_or_default();
        if text.lines().any(|l| l == want) {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the server never marked `{want}`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_tools_become_tool_messages_and_the_agent_carries_on() {
    let Some(py) = python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let server = faults_server(&py, &marks);
    let engine = real_engine();
    let config = AgentConfig {
        tool_timeout_secs: 3.0,
        // Small enough that the capped megabyte stays a short prompt.
        max_tool_result_bytes: 512,
        max_tokens: 64,
        ..agent_with(vec![server.clone()], "You are a test assistant.")
    };
    let agent = engine.spawn_agent(config, vec![]).await.unwrap();
    let answers = |label: &'static str| {
        let agent = agent.clone();
        async move {
            let r = agent
                .ask(Ask::new("Say hello.").tool_choice(ToolChoice::None))
                .await
                .unwrap_or_else(|e| panic!("after {label}: {e}"));
            assert!(!r.text.is_empty(), "after {label}");
        }
    };

    // Nested objects and enums: the call validates against the schema.
    let book = call(
        &agent,
        "Book a window seat to Kyoto, Japan for 3 nights.",
        "book",
    )
    .await;
    assert!(!book.failed, "{book:?}");
    validates(&input_schema(&server, "book").await, &book.call.arguments);
    assert!(book.result.starts_with("booked {"), "{}", book.result);

    let slow = call(&agent, "Run slow.", "slow").await;
    assert!(slow.failed);
    assert_eq!(slow.result, "error: tool `slow` timed out after 3.0 s");
    // The timed-out call was cancelled with MCP's notifications/cancelled.
    wait_for_mark(&marks, "cancelled");

    let fail = call(&agent, "Run fail with reason oops.", "fail").await;
    assert!(fail.failed);
    assert!(
        fail.result.starts_with("error: ") && fail.result.contains("failed on purpose"),
        "{}",
        fail.result
    );

    let big = call(&agent, "Run big.", "big").await;
    assert!(!big.failed);
    assert!(big.result.len() <= 512, "{}", big.result.len());
    assert!(big.result.starts_with("0123456789abcdef"));
    assert!(
        big.result.ends_with("bytes]"),
        "{}",
        &big.result[big.result.len() - 40..]
    );

    // Each turn so far has been answered; the next ones start afresh (shorter
    // prompts, quicker tests).
    agent.ask(troupe::agent::Reset).await.unwrap();

    // A changed tool list is picked up before the next turn.
    let unlock = call(&agent, "Run unlock.", "unlock").await;
    assert_eq!(unlock.result, "unlocked");
    let secret = call(&agent, "What is the secret word?", "secret").await;
    assert_eq!(secret.result, "the secret word is pelican");

    agent.ask(troupe::agent::Reset).await.unwrap();
    // The server exits mid-call: a tool error, then the server is restarted once.
    let crash = call(&agent, "Run crash.", "crash").await;
    assert!(crash.failed);
    assert!(
        crash
            .result
            .starts_with("error: MCP server `faults` stopped during the call"),
        "{}",
        crash.result
    );
    answers("a crash").await;
    // The restarted server has not unlocked `secret`: the agent dropped it.
    let history = agent.ask(History).await.unwrap();
    assert!(
        !history[0].content.contains("- secret("),
        "{}",
        history[0].content
    );
    let again = call(&agent, "Run fail with reason again.", "fail").await;
    assert!(
        again.result.contains("failed on purpose"),
        "{}",
        again.result
    );
    let crash2 = call(&agent, "Run crash.", "crash").await;
    assert!(crash2.failed);
    let gone = call(&agent, "Run fail with reason third.", "fail").await;
    assert!(
        gone.result.contains("restarted once already"),
        "{}",
        gone.result
    );
}

/// Whether process `pid` has ended (gone, or a zombie).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

/// Plumbing only (the tiny model: a forced call of a tool without arguments is
/// written by the grammar alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_share_the_server_and_it_stops_with_the_last_agent() {
    let Some(py) = python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let engine = Engine::serve(Arc::new(tiny(WeightsMode::Native)), Default::default()).unwrap();
    let mut server = faults_server(&py, &marks);
    // A short tools prompt: the tiny model's context is 512 tokens.
    server.tools = vec!["unlock".into(), "secret".into()];
    let config = AgentConfig {
        max_tokens: 48,
        ..agent_with(vec![server], "")
    };
    let agent = engine.spawn_agent(config, vec![]).await.unwrap();
    let text = wait_for_mark(&marks, "started");
    let pid: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .unwrap()
        .parse()
        .unwrap();
    let fork = agent.ask(troupe::agent::Fork::default()).await.unwrap();
    // The fork's `unlock` reaches the parent's server process: the parent has
    // `secret` on its next turn.
    assert_eq!(call(&fork, "unlock", "unlock").await.result, "unlocked");
    assert_eq!(
        call(&agent, "secret", "secret").await.result,
        "the secret word is pelican"
    );
    agent.stop_gracefully().await.unwrap();
    agent.wait_for_shutdown().await;
    // The fork still uses the server.
    assert!(!ended(pid));
    fork.ask(troupe::agent::Reset).await.unwrap();
    assert_eq!(
        call(&fork, "secret", "secret").await.result,
        "the secret word is pelican"
    );
    fork.stop_gracefully().await.unwrap();
    fork.wait_for_shutdown().await;
    for _ in 0..200 {
        if ended(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ended(pid), "the server outlived its agents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_do_not_start_are_named_errors_at_spawn() {
    let engine = Engine::serve(Arc::new(tiny(WeightsMode::Native)), Default::default()).unwrap();
    let spawn = |server: McpServerConfig| {
        let engine = engine.clone();
        async move {
            engine
                .spawn_agent(agent_with(vec![server], ""), vec![])
                .await
                .expect_err("spawned")
                .to_string()
        }
    };
    let missing = spawn(McpServerConfig::stdio(
        "nothing",
        "/no/such/mcp-server",
        &[],
    ))
    .await;
    assert!(
        missing.starts_with("MCP server `nothing`: cannot start `/no/such/mcp-server`"),
        "{missing}"
    );
    // Without the servers connected, the sync spawn refuses with a pointer.
    let e = engine
        .agent(
            agent_with(vec![McpServerConfig::stdio("x", "y", &[])], ""),
            vec![],
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("spawn_agent"), "{e}");

    let Some(py) = python() else {
        return;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/mcp_test_server.py");
    let script = script.to_str().unwrap();
    let mut garbage = McpServerConfig::stdio("garbage", py.to_str().unwrap(), &[script, "garbage"]);
    garbage.startup_timeout_secs = Some(5.0);
    let e = spawn(garbage).await;
    assert!(e.starts_with("MCP server `garbage`: "), "{e}");

    let mut old = McpServerConfig::stdio("old", py.to_str().unwrap(), &[script, "badversion"]);
    old.startup_timeout_secs = Some(5.0);
    let e = spawn(old).await;
    assert!(
        e.starts_with("MCP server `old`: speaks MCP protocol version 1999-01-01"),
        "{e}"
    );
}
