//! `troupe mcp serve` driven by the `mcp` Python client (`tests/python/mcp_client.py`),
//! on stdio and on streamable HTTP: `tools/list` shows the agents as `ask_<agent>`
//! tools taking a `task` string, and `tools/call` on the calculator agent answers
//! "The answer is 391." for 17 * 23 (then 42 for 6 * 7, in the same session). Also
//! `troupe mcp tools`, which prints what a model sees of a server's tools.

mod common;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

fn client_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/mcp_client.py")
}

/// Checks the client's report.
fn check(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    });
    let tools = report["tools"].as_object().unwrap();
    let mut names: Vec<&str> = tools.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ask_calculator", "ask_clock"], "{report}");
    assert_eq!(tools["ask_calculator"]["required"][0], "task");
    assert_eq!(
        tools["ask_calculator"]["properties"]["task"]["type"],
        "string"
    );
    let replies = report["replies"].as_array().unwrap();
    assert_eq!(replies[0]["error"], false, "{report}");
    assert_eq!(replies[0]["text"], "The answer is 391.", "{report}");
    assert_eq!(replies[1]["text"], "The answer is 42.", "{report}");
}

#[test]
fn agents_are_mcp_tools_on_stdio() {
    let Some(py) = python() else {
        return;
    };
    let model = real_model_path();
    let out = Command::new(py)
        .arg(client_script())
        .arg("stdio")
        .arg(troupe_bin())
        .args(["--model", model.to_str().unwrap()])
        .args(["mcp", "serve", "--agent", "calculator", "--agent", "clock"])
        .output()
        .unwrap();
    check(&out);
}

/// Kills the server when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agents_are_mcp_tools_on_streamable_http() {
    let Some(py) = python() else {
        return;
    };
    let model = real_model_path();
    let mut server = KillOnDrop(
        Command::new(troupe_bin())
            .args(["--model", model.to_str().unwrap()])
            .args([
                "mcp",
                "serve",
                "--http",
                "0",
                "--agent",
                "calculator",
                "--agent",
                "clock",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = server.0.stderr.take().unwrap();
    let mut url = None;
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if let Some(u) = line.strip_prefix("troupe mcp serve: listening on ") {
            url = Some(u.to_string());
            break;
        }
    }
    let url = url.expect("the server printed no address");
    let out = Command::new(py)
        .arg(client_script())
        .arg("http")
        .arg(&url)
        .output()
        .unwrap();
    check(&out);
}

#[test]
fn mcp_tools_prints_the_signatures_the_model_sees() {
    let Some(bin) = mcp_server_bin("mcp-server-everything") else {
        return;
    };
    let out = Command::new(troupe_bin())
        .args(["--model", tiny_model_path().to_str().unwrap()])
        .args(["mcp", "tools", &format!("{} stdio", bin.display())])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "- echo(message: string): Echoes back the input string (message is message to echo)",
        "- get-sum(a: number, b: number): Returns the sum of two numbers",
    ] {
        assert!(stdout.contains(line), "{line} not in:\n{stdout}");
    }
    assert!(
        stdout.contains("tools; each call is constrained"),
        "{stdout}"
    );

    let out = Command::new(troupe_bin())
        .args(["--model", tiny_model_path().to_str().unwrap()])
        .args(["mcp", "tools", "/no/such/server --flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MCP server `server`: cannot start `/no/such/server`"),
        "{stderr}"
    );
}

#[test]
fn run_gives_a_ready_made_agent_the_tools_of_an_mcp_server() {
    let Some(bin) = mcp_server_bin("mcp-server-filesystem") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lisbon.txt"), "Lisbon is in Portugal.\n").unwrap();
    let root = dir.path().to_str().unwrap();
    let out = Command::new(troupe_bin())
        .args(["--model", real_model_path().to_str().unwrap()])
        .args(["run", "files", "--root", root, "--max-tokens", "64"])
        .args(["--mcp", &format!("fs={} {root}", bin.display())])
        .arg("Read the file lisbon.txt")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(
            "agent files (tools: search_files, read_file, list_files, the tools of MCP server `fs`)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("answer: "), "{stdout}");
}

/// troupe's own MCP client over streamable HTTP, against `troupe mcp serve --http`:
/// an agent calls the calculator agent of another troupe process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_uses_another_troupes_agent_over_streamable_http() {
    use std::sync::Arc;
    use troupe::agent::{AgentConfig, Ask, McpServerConfig, ToolChoice};
    let model = real_model_path();
    let mut server = KillOnDrop(
        Command::new(troupe_bin())
            .args(["--model", model.to_str().unwrap()])
            .args(["mcp", "serve", "--http", "0", "--agent", "calculator"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = server.0.stderr.take().unwrap();
    let url = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("troupe mcp serve: listening on ")
                .map(str::to_string)
        })
        .expect("the server printed no address");
    let engine = troupe::engine::Engine::serve(
        Arc::new(real(troupe::model::WeightsMode::Native)),
        Default::default(),
    )
    .unwrap();
    let config = AgentConfig {
        mcp_servers: vec![McpServerConfig::http("troupe", url)],
        max_tokens: 64,
        max_tool_steps: 1,
        ..AgentConfig::new("asker", "You delegate arithmetic to the calculator.")
    };
    let agent = engine.spawn_agent(config, vec![]).await.unwrap();
    let r = agent
        .ask(
            Ask::new("Ask the calculator: what is 17 * 23?")
                .tool_choice(ToolChoice::Tool("ask_calculator".into())),
        )
        .await
        .unwrap();
    let run = &r.tool_runs[0];
    assert!(!run.failed, "{run:?}");
    assert!(
        run.result.starts_with("The answer is ") || run.result.starts_with("I cannot compute"),
        "{run:?}"
    );
}
