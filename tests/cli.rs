//! The `troupe` binary end to end on the tiny model: model path/info, tokenize and
//! its inverse, raw generation, and the errors a user sees.

mod common;

use std::process::{Command, Output};

use common::*;

fn troupe(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::troupe_bin());
    cmd.args(args).env_remove("TROUPE_MODEL");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run troupe")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "troupe failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn model_path_and_info_use_the_given_model() {
    let tiny = tiny_model_path();
    let tiny = tiny.to_str().unwrap();
    assert_eq!(
        stdout(&troupe(&["model", "path", "--model", tiny], &[])).trim(),
        tiny
    );
    // TROUPE_MODEL works like --model.
    assert_eq!(
        stdout(&troupe(&["model", "path"], &[("TROUPE_MODEL", tiny)])).trim(),
        tiny
    );
    let info = stdout(&troupe(&["model", "info", "--json", "--model", tiny], &[]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["config"]["n_layers"], 2);
    assert_eq!(v["chat_template_embedded"], false);
    assert_eq!(v["tensor_types"]["Q4_1"], 14);
    let table = stdout(&troupe(&["model", "info", "--model", tiny], &[]));
    assert!(
        table.contains("weights") && table.contains("auto"),
        "{table}"
    );
}

#[test]
fn tokenize_round_trips_through_the_cli() {
    let tiny = tiny_model_path();
    let tiny = tiny.to_str().unwrap();
    let ids = stdout(&troupe(
        &["tokenize", "the cat is on the mat", "--model", tiny],
        &[],
    ));
    let parsed: Vec<u32> = serde_json::from_str(ids.trim()).unwrap();
    assert!(!parsed.is_empty());
    let text = stdout(&troupe(
        &["tokenize", "--decode", ids.trim(), "--model", tiny],
        &[],
    ));
    assert_eq!(text.trim_end_matches('\n'), "the cat is on the mat");
}

#[test]
fn generate_runs_and_is_deterministic() {
    let tiny = tiny_model_path();
    let tiny = tiny.to_str().unwrap();
    // Raw prompts: the tiny model's greedy chat reply is an immediate end of turn.
    let args = [
        "generate",
        "--raw",
        "--prompt",
        "hello",
        "--max-tokens",
        "12",
        "--model",
        tiny,
    ];
    let a = stdout(&troupe(&args, &[]));
    let b = stdout(&troupe(&args, &[]));
    assert_eq!(a, b);
    assert!(!a.trim().is_empty(), "empty greedy reply");
    let sampled = [
        "generate",
        "--raw",
        "--prompt",
        "hello",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--seed",
        "3",
        "--model",
        tiny,
    ];
    let first = stdout(&troupe(&sampled, &[]));
    assert_eq!(first, stdout(&troupe(&sampled, &[])));
    // Something was generated (two empty outputs would be equal too).
    assert!(!first.trim().is_empty(), "empty sampled reply");
}

/// `troupe generate` with each grammar flag (on the default model, so that the
/// replies end by completing their grammar): each output is checked by an oracle
/// independent of llguidance (the regex crate, a JSON Schema validator, a list).
#[test]
fn generate_grammar_flags_constrain_the_output() {
    let model = real_model_path();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gen = |prompt: &str, flags: &[&str]| -> String {
        let mut args = vec![
            "generate",
            "--prompt",
            prompt,
            "--max-tokens",
            "48",
            "--model",
            model,
        ];
        args.extend_from_slice(flags);
        let out = stdout(&troupe(&args, &[]));
        out.strip_suffix('\n').unwrap_or(&out).to_string()
    };

    let date = gen(
        "When was the Eiffel Tower built?",
        &["--regex", "[0-9]{4}-[0-9]{2}"],
    );
    assert!(
        regex::Regex::new("^[0-9]{4}-[0-9]{2}$")
            .unwrap()
            .is_match(&date),
        "{date:?}"
    );

    let color = gen("Pick a color.", &["--choice", "red,green,blue"]);
    assert!(
        ["red", "green", "blue"].contains(&color.as_str()),
        "{color:?}"
    );

    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100}
        },
        "required": ["city", "year"],
        "additionalProperties": false
    });
    let schema_file = dir.path().join("schema.json");
    std::fs::write(&schema_file, schema.to_string()).unwrap();
    let json = gen(
        "Name a city and the year it was founded, as JSON.",
        &["--json-schema", schema_file.to_str().unwrap()],
    );
    let value: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json:?} is not JSON: {e}"));
    let validator = jsonschema::validator_for(&schema).unwrap();
    assert!(
        validator.is_valid(&value),
        "{json:?} does not match the schema"
    );

    let lark_file = dir.path().join("g.lark");
    std::fs::write(
        &lark_file,
        "start: \"answer: \" WORD (\" \" WORD){0,2}\nWORD: /[a-z]{1,10}/\n",
    )
    .unwrap();
    let words = gen(
        "Describe the sea in three words.",
        &["--lark", lark_file.to_str().unwrap()],
    );
    assert!(
        regex::Regex::new("^answer: [a-z]{1,10}( [a-z]{1,10}){0,2}$")
            .unwrap()
            .is_match(&words),
        "{words:?}"
    );
}

#[test]
fn missing_default_model_says_how_to_fetch() {
    let home = tempfile::tempdir().unwrap();
    let o = troupe(
        &["model", "info"],
        &[("TROUPE_HOME", home.path().to_str().unwrap())],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("troupe model fetch"), "{err}");
}

#[test]
fn bad_model_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, b"not a model at all").unwrap();
    let o = troupe(&["model", "info", "--model", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn chat_reads_lines_and_reports_reuse() {
    use std::io::Write;
    use std::process::Stdio;
    let tiny = tiny_model_path();
    let mut child = Command::new(common::troupe_bin())
        .args([
            "chat",
            "--max-tokens",
            "5",
            "--model",
            tiny.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\nand again\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    let usage: Vec<&str> = text.lines().filter(|l| l.starts_with("usage: ")).collect();
    assert_eq!(usage.len(), 2, "{text}");
    let field = |l: &str, k: &str| -> usize {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse::<f64>()
            .unwrap() as usize
    };
    assert_eq!(field(usage[0], "reused"), 0);
    assert!(field(usage[1], "reused") > 0, "{text}");
    assert!(field(usage[1], "computed") < field(usage[1], "reused") + field(usage[0], "computed"));
}
