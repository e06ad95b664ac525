//! Every program in `examples/` runs to completion with the default model (each
//! bounds its own tokens) and prints what it is meant to show. `cargo test` builds
//! the examples next to this test's binary; this runs those builds.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn run_example(name: &str) -> String {
    common::real_model_path();
    let dir: PathBuf = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples");
    let exe = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        exe.exists(),
        "{} is not built: `cargo test` builds the examples",
        exe.display()
    );
    // The default model, whatever TROUPE_MODEL the environment holds.
    let out = Command::new(&exe)
        .env_remove("TROUPE_MODEL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The number right after `prefix` in `out`.
fn number_after(out: &str, prefix: &str) -> usize {
    let at = out
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"));
    out[at + prefix.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in:\n{out}"))
}

#[test]
fn hello_agent_reuses_its_cache() {
    let out = run_example("hello_agent");
    let reused: Vec<&str> = out.lines().filter(|l| l.contains("reused")).collect();
    assert_eq!(reused.len(), 2, "{out}");
    assert_eq!(number_after(reused[0], "reused "), 0, "{out}");
    assert!(number_after(reused[1], "reused ") > 0, "{out}");
}

#[test]
fn tool_agent_computes_with_its_tool() {
    let out = run_example("tool_agent");
    assert!(out.contains("called calculate with"), "{out}");
    assert!(out.contains("-> 391"), "{out}");
}

#[test]
fn pipeline_runs_each_stage() {
    let out = run_example("pipeline");
    for marker in ["[poet]", "[critic]", "result:"] {
        assert!(out.contains(marker), "{marker} missing:\n{out}");
    }
}

#[test]
fn fan_out_batches_the_panel() {
    let out = run_example("fan_out");
    for marker in ["[chef]", "[doctor]", "[farmer]", "[judge]"] {
        assert!(out.contains(marker), "{marker} missing:\n{out}");
    }
    let batch: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("largest batch: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no batch line:\n{out}"));
    assert!(batch >= 2, "the panel's requests shared steps: {out}");
}

#[test]
fn router_routes_each_task() {
    let out = run_example("router");
    assert!(
        out.contains("> What is 12 * 12?\n[calculator] The answer is 144."),
        "{out}"
    );
    assert!(out.contains("> Write a haiku about rain.\n["), "{out}");
}

#[test]
fn group_chat_ends() {
    let out = run_example("group_chat");
    assert!(
        out.contains("[host]") && out.contains("ended after"),
        "{out}"
    );
}

#[test]
fn fork_explore_keeps_one_answer() {
    let out = run_example("fork_explore");
    assert!(out.contains("best of 4"), "{out}");
    assert!(
        number_after(&out, "that fork reused ") > 0,
        "the fork reused the prefix: {out}"
    );
}

#[test]
fn custom_tool_is_called() {
    let out = run_example("custom_tool");
    assert!(out.contains("stock {"), "{out}");
    assert!(out.contains("answer:"), "{out}");
}
