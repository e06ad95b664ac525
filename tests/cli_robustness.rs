//! Each hostile input of issue 11, through the `troupe` binary: a clean error (or the
//! correct output), no panic text, no backtrace, and an exit that is not by a signal.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use troupe::model::gguf_check::header_map;
use troupe::model::tiny::{write_tiny_model, TinyConfig};

/// Runs troupe with `args` (and `stdin`), as CI does: `RUST_BACKTRACE=1`; killed
/// after two minutes (exit 124), so a hang fails the test instead of stalling it.
fn troupe(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "120"])
        .arg(common::troupe_bin())
        .args(args)
        .env_remove("TROUPE_MODEL")
        .env_remove("TROUPE_BACKTRACE")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run troupe");
    if let Some(text) = stdin {
        // A process that fails at start does not read it.
        let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// Asserts a clean run: no panic or backtrace, not killed by a signal; returns
/// (success, stdout, stderr).
fn clean(what: &str, o: &Output) -> (bool, String, String) {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.code().is_some(),
        "{what}: killed by a signal; {err}"
    );
    let (lerr, lout) = (err.to_lowercase(), out.to_lowercase());
    for bad in ["panicked", "stack backtrace", "rust_backtrace"] {
        assert!(
            !lerr.contains(bad) && !lout.contains(bad),
            "{what}: {bad}:\n{err}\n{out}"
        );
    }
    (o.status.success(), out, err)
}

/// Asserts a clean failure whose message contains `needle`.
fn fails_with(what: &str, o: &Output, needle: &str) {
    let (ok, out, err) = clean(what, o);
    assert!(!ok, "{what}: succeeded:\n{out}");
    assert!(
        err.contains("error:") && err.contains(needle),
        "{what}: {err}"
    );
    assert!(err.lines().count() <= 3, "{what}: a long report:\n{err}");
}

/// The tiny model with one header field replaced.
fn mutated(dir: &Path, field: &str, value: u64) -> PathBuf {
    let src = tiny_model_path();
    let mut bytes = std::fs::read(&src).unwrap();
    let f = header_map(&src)
        .unwrap()
        .fields
        .into_iter()
        .find(|f| f.name == field)
        .unwrap_or_else(|| panic!("no field {field}"));
    let (at, w) = (f.offset as usize, usize::from(f.width));
    bytes[at..at + w].copy_from_slice(&value.to_le_bytes()[..w]);
    let p = dir.join(format!("{}.gguf", field.replace(' ', "_")));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn malformed_ggufs_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    // token_embd.weight claims 2^58 x 64 elements: the count wraps to 0 unchecked.
    let p = mutated(dir.path(), "token_embd.weight dim 1", 1 << 58);
    for cmd in [&["model", "info"][..], &["generate", "--prompt", "hi"]] {
        let args: Vec<&str> = cmd.iter().copied().chain(["--model", s(&p)]).collect();
        fails_with("2^58 rows", &troupe(&args, None), "token_embd.weight");
    }
    // A context of 2^32 - 1: loads, capped (no 512 GiB rope tables).
    let p = mutated(dir.path(), "llama.context_length", 0xFFFF_FFFF);
    let (ok, out, err) = clean(
        "huge context",
        &troupe(&["model", "info", "--json", "--model", s(&p)], None),
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["context_length"], 1 << 20);
    // EOS past the vocabulary: every command that loads the model says so.
    let p = mutated(dir.path(), "tokenizer.ggml.eos_token_id", 100_000);
    for cmd in [
        &["model", "info"][..],
        &["chat"],
        &["generate", "--prompt", "hi", "--regex", "[a-z]+"],
        &["run", "calculator", "2+2"],
        &["loadtest", "--agents", "1", "--turns", "1"],
    ] {
        let args: Vec<&str> = cmd.iter().copied().chain(["--model", s(&p)]).collect();
        fails_with(
            &format!("eos {cmd:?}"),
            &troupe(&args, Some("hi\n")),
            "tokenizer.ggml.eos_token_id",
        );
    }
    // general.alignment = 0 in a 57-byte file.
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    let key = b"general.alignment";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(b.len(), 57);
    let p = dir.path().join("align0.gguf");
    std::fs::write(&p, b).unwrap();
    fails_with(
        "alignment 0",
        &troupe(&["model", "info", "--model", s(&p)], None),
        "general.alignment",
    );
}

#[test]
fn a_looping_chat_template_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("loop.gguf");
    write_tiny_model(
        &p,
        &TinyConfig {
            chat_template: Some(
                "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
                    .into(),
            ),
            ..TinyConfig::default()
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    let o = troupe(&["chat", "--model", s(&p)], Some("hi\n"));
    let (_, out, err) = clean("looping template", &o);
    assert!(
        format!("{out}{err}").contains("exceeded its fuel"),
        "{out}\n{err}"
    );
    assert!(started.elapsed().as_secs() < 120);
    fails_with(
        "looping template, generate",
        &troupe(&["generate", "--prompt", "hi", "--model", s(&p)], None),
        "fuel",
    );
}

#[test]
fn a_tiny_temperature_is_greedy_and_huge_max_tokens_are_capped_or_refused() {
    let tiny = tiny_model_path();
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--prompt",
            "the cat",
            "--max-tokens",
            "12",
            "--model",
            s(&tiny),
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = clean("generate", &troupe(&args, None));
        assert!(ok, "{err}");
        out
    };
    assert_eq!(gen(&["--temperature", "1e-40"]), gen(&[]));
    assert_eq!(gen(&["--temperature", "0.000001", "--seed", "3"]), gen(&[]));
    // Capped by the context.
    let (ok, _, err) = clean(
        "huge max tokens",
        &troupe(
            &[
                "generate",
                "--prompt",
                "hi",
                "--max-tokens",
                "18446744073709551615",
                "--model",
                s(&tiny),
            ],
            None,
        ),
    );
    assert!(ok, "{err}");
    // Refused where it becomes an agent's config.
    fails_with(
        "chat max tokens",
        &troupe(
            &[
                "chat",
                "--max-tokens",
                "18446744073709551615",
                "--model",
                s(&tiny),
            ],
            Some("hi\n"),
        ),
        "max_tokens",
    );
    fails_with(
        "run max tokens",
        &troupe(
            &[
                "run",
                "calculator",
                "1+1",
                "--max-tokens",
                "18446744073709551615",
                "--model",
                s(&tiny),
            ],
            None,
        ),
        "max_tokens",
    );
    fails_with(
        "tiny temperature below zero",
        &troupe(
            &[
                "generate",
                "--prompt",
                "hi",
                "--temperature=-1e-40",
                "--model",
                s(&tiny),
            ],
            None,
        ),
        "temperature",
    );
}

#[test]
fn loadtest_and_config_numbers_are_checked() {
    let tiny = tiny_model_path();
    for (args, needle) in [
        (&["--duration=-1"][..], "--duration"),
        (&["--duration=inf"], "--duration"),
        (&["--duration=nan"], "--duration"),
        (&["--turns", "100000000000000"], "--turns"),
        (&["--turns", "0"], "--turns"),
        (&["--agents", "0"], "--agents"),
        (&["--agents", "100000000"], "--agents"),
        (&["--think-ms", "inf"], "--think-ms"),
        (&["--think-ms=-5"], "--think-ms"),
        (&["--tool-ms", "inf"], "--tool-ms"),
        (&["--tool-ms", "nan"], "--tool-ms"),
        (&["--max-tokens", "18446744073709551615"], "--max-tokens"),
        (&["--request-rate", "0"], "--request-rate"),
        (&["--request-rate", "nan"], "--request-rate"),
        (&["--max-concurrency", "0"], "--max-concurrency"),
        (&["--goodput", "ttft"], "--goodput"),
        (&["--goodput", "itl:5"], "--goodput"),
        (
            &["--url", "https://127.0.0.1:1", "--tokenizer", s(&tiny)],
            "https",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1",
                "--no-batching",
                "--tokenizer",
                s(&tiny),
            ],
            "--no-batching",
        ),
    ] {
        let mut a = vec!["loadtest", "--model", s(&tiny)];
        a.extend_from_slice(args);
        fails_with(&format!("loadtest {args:?}"), &troupe(&a, None), needle);
    }
    let dir = tempfile::tempdir().unwrap();
    for (line, needle) in [
        ("tool_timeout_secs = inf", "tool_timeout_secs"),
        ("tool_timeout_secs = 1e300", "tool_timeout_secs"),
        ("tool_timeout_secs = -1.0", "tool_timeout_secs"),
        ("max_tokens = 9223372036854775807", "max_tokens"),
        ("max_tool_steps = 9223372036854775807", "max_tool_steps"),
    ] {
        let cfg = dir.path().join("a.toml");
        std::fs::write(&cfg, format!("{line}\n")).unwrap();
        fails_with(
            line,
            &troupe(
                &["chat", "--agent", s(&cfg), "--model", s(&tiny)],
                Some("hi\n"),
            ),
            needle,
        );
    }
}

/// The tiny model with room for the ready-made agents' prompts.
fn roomy(dir: &Path) -> PathBuf {
    let p = dir.join("roomy.gguf");
    write_tiny_model(
        &p,
        &TinyConfig {
            context_length: 4096,
            ..TinyConfig::default()
        },
    )
    .unwrap();
    p
}

#[test]
fn a_tool_call_cut_by_max_tokens_is_never_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let m = roomy(dir.path());
    let o = troupe(
        &[
            "run",
            "calculator",
            "What is 9^9^9^9^9^9^9^9^9?",
            "--max-tokens",
            "12",
            "--model",
            s(&m),
        ],
        None,
    );
    let (ok, out, err) = clean("cut call", &o);
    assert!(!out.contains("answer: <tool_call>"), "{out}");
    if !ok {
        assert!(err.contains("inside a tool call"), "{err}");
    }
}

#[test]
fn a_huge_note_does_not_flood_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let m = roomy(dir.path());
    let notes = dir.path().join("notes.json");
    let big: std::collections::BTreeMap<&str, String> =
        [("a", "v".repeat(5 << 20)), ("b", "w".into())].into();
    std::fs::write(&notes, serde_json::to_string(&big).unwrap()).unwrap();
    let o = troupe(
        &[
            "run",
            "notes",
            "What is a?",
            "--notes",
            s(&notes),
            "--model",
            s(&m),
        ],
        None,
    );
    let (_, out, _) = clean("huge note", &o);
    for line in out.lines().filter(|l| l.contains("tool")) {
        assert!(line.len() < 1000, "{}", &line[..200]);
    }
}

#[test]
fn a_turn_that_cannot_fit_keeps_the_history() {
    let tiny = tiny_model_path();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(&cfg, "context_policy = \"drop_oldest\"\nmax_tokens = 8\n").unwrap();
    let huge = "ab ".repeat(2000);
    let o = troupe(
        &["chat", "--agent", s(&cfg), "--model", s(&tiny)],
        Some(&format!("hello there\n{huge}\nand again\n")),
    );
    let (_, out, _) = clean("drop_oldest", &o);
    assert!(out.contains("error:"), "{out}");
    let usage: Vec<usize> = out
        .lines()
        .filter_map(|l| l.strip_prefix("usage: reused="))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(usage.len(), 2, "{out}");
    assert!(usage[1] > 0, "the history and its cache were lost: {out}");
}

#[test]
fn library_errors_print_their_chain_without_a_backtrace() {
    let o = troupe(
        &["model", "info", "--model", "/nonexistent/model.gguf"],
        None,
    );
    fails_with("missing model", &o, "model file not found");
    // Asked for, the backtrace is there.
    let o = Command::new(common::troupe_bin())
        .args(["model", "info", "--model", "/nonexistent/model.gguf"])
        .env("TROUPE_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().count() > 3, "{err}");
}

#[test]
fn the_benches_run_on_a_tiny_vocabulary() {
    let tiny = tiny_model_path();
    for args in [
        &["bench", "engine", "--concurrency", "1"][..],
        &[
            "bench",
            "forward",
            "--batch-sizes",
            "1",
            "--batch-steps",
            "2",
        ],
    ] {
        let mut a = args.to_vec();
        a.extend(["--model", s(&tiny)]);
        let (ok, out, err) = clean(&format!("{args:?}"), &troupe(&a, None));
        assert!(ok, "{args:?}: {err}\n{out}");
    }
}
