//! The CLI's tracing: `RUST_LOG` adds debug lines on stderr and leaves stdout as it
//! was; `--log-format json` lines parse as JSON; `--trace FILE` writes a Chrome
//! trace with one track per agent and an engine track with one event per step.

mod common;

use std::process::{Command, Output};

use common::*;

fn troupe(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::troupe_bin());
    cmd.args(args)
        .env_remove("TROUPE_MODEL")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run troupe");
    assert!(
        out.status.success(),
        "troupe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout with the timings (which vary between runs) blanked.
fn without_timings(out: &Output) -> String {
    let re = regex::Regex::new(r"\d+(\.\d+)? ?(ms|s)\b").unwrap();
    re.replace_all(&String::from_utf8_lossy(&out.stdout), "T")
        .into_owned()
}

#[test]
fn rust_log_adds_debug_lines_on_stderr_only() {
    let model = real_model_path();
    let args = [
        "run",
        "calculator",
        "What is 17 * 23?",
        "--model",
        model.to_str().unwrap(),
    ];
    let quiet = troupe(&args, &[]);
    let debug = troupe(&args, &[("RUST_LOG", "troupe=debug")]);
    assert_eq!(without_timings(&quiet), without_timings(&debug));
    assert!(String::from_utf8_lossy(&quiet.stdout).contains("391"));
    let quiet_err = String::from_utf8_lossy(&quiet.stderr);
    let debug_err = String::from_utf8_lossy(&debug.stderr);
    assert!(!quiet_err.contains("DEBUG"), "{quiet_err}");
    for what in ["DEBUG", "turn", "model_call", "admission", "tool_call"] {
        assert!(debug_err.contains(what), "no {what} in: {debug_err}");
    }
    let json = troupe(
        &[&["--log-format", "json"], &args[..]].concat(),
        &[("RUST_LOG", "troupe=debug")],
    );
    let lines: Vec<&str> = std::str::from_utf8(&json.stderr).unwrap().lines().collect();
    assert!(lines.len() > 5, "{lines:?}");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("level").is_some(), "{l}");
    }
}

#[test]
fn trace_file_has_a_track_per_agent_and_one_event_per_engine_step() {
    let dir = tempfile::tempdir().unwrap();
    let (trace, report) = (dir.path().join("t.json"), dir.path().join("r.json"));
    let tiny = tiny_model_path();
    troupe(
        &[
            "--model",
            tiny.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
            "loadtest",
            "--agents",
            "4",
            "--turns",
            "2",
            "--system-tokens",
            "20",
            "--user-tokens",
            "5",
            "--max-tokens",
            "8",
            "--json",
            report.to_str().unwrap(),
        ],
        &[],
    );
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let mut tracks: Vec<&str> = events
        .iter()
        .filter(|e| e["ph"] == "M")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    tracks.sort_unstable();
    assert_eq!(
        tracks,
        ["agent-0", "agent-1", "agent-2", "agent-3", "engine"]
    );
    let engine_tid = events
        .iter()
        .find(|e| e["ph"] == "M" && e["args"]["name"] == "engine")
        .unwrap()["tid"]
        .clone();
    let steps: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["name"] == "engine_step")
        .collect();
    assert_eq!(
        steps.len() as u64,
        r["steps"].as_u64().unwrap(),
        "one event per step"
    );
    for s in &steps {
        assert_eq!(s["tid"], engine_tid);
        let agents = s["args"]["agents"].as_str().unwrap();
        let n = agents
            .split(',')
            .filter(|a| a.starts_with("agent-"))
            .count();
        assert_eq!(n as u64, s["args"]["rows"].as_u64().unwrap(), "{s}");
    }
    // Each agent's track holds its turns (two each).
    for a in 0..4 {
        let tid = events
            .iter()
            .find(|e| e["ph"] == "M" && e["args"]["name"] == format!("agent-{a}"))
            .unwrap()["tid"]
            .clone();
        let turns = events
            .iter()
            .filter(|e| e["name"] == "turn" && e["tid"] == tid)
            .count();
        assert_eq!(turns, 2, "agent-{a}");
    }
}
