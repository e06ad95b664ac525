//! `troupe agents`, `troupe run` and `troupe workflow` end to end with the default
//! model: the calculator shows its call and 391, every demo workflow runs, and bad
//! names and folders get errors that say what is wrong.

mod common;

use std::process::{Command, Output};

fn troupe(args: &[&str]) -> Output {
    // The default model, whatever TROUPE_MODEL the environment holds.
    Command::new(common::troupe_bin())
        .args(args)
        .env_remove("TROUPE_MODEL")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}\n{out}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn agents_lists_the_ready_made_agents() {
    let out = ok(&troupe(&["agents"]));
    for name in ["calculator", "files", "clock", "notes", "researcher"] {
        assert!(out.lines().any(|l| l.starts_with(name)), "{name}:\n{out}");
    }
}

#[test]
fn run_calculator_shows_the_call_and_391() {
    common::real_model_path();
    let out = ok(&troupe(&["run", "calculator", "What is 17 * 23?"]));
    let call = out.lines().find(|l| l.contains("tool call")).unwrap_or("");
    assert!(call.contains("calculate {\"expression\":"), "{out}");
    assert!(out.contains("tool result") && out.contains(" 391"), "{out}");
    let answer = out.lines().find(|l| l.starts_with("answer:")).unwrap_or("");
    assert!(answer.contains("391"), "{out}");
    assert!(out.contains("tokens: reused "), "{out}");
}

#[test]
fn run_refuses_unknown_agents_and_missing_roots() {
    let o = troupe(&["run", "poet", "x"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no ready-made agent `poet`"), "{err}");
    let o = troupe(&["run", "files", "--root", "/no/such/dir", "x"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/dir"));
}

#[test]
fn every_demo_workflow_runs() {
    common::real_model_path();
    for (name, marker) in [
        ("pipeline", "<- editor:"),
        ("fan-out", "<- judge:"),
        ("router", "=> picked "),
        ("group-chat", "== ended: "),
    ] {
        let out = ok(&troupe(&["workflow", name, "--max-tokens", "16"]));
        assert!(out.contains(marker), "{name}: {marker} missing:\n{out}");
        assert!(out.contains("\nresult: "), "{name}:\n{out}");
    }
    let o = troupe(&["workflow", "dance"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no demo workflow `dance`"));
}
