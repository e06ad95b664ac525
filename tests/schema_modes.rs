//! JSON Schemas with keywords llguidance cannot enforce while decoding: a strict
//! schema is refused naming the keyword; a lenient one compiles with the keyword
//! dropped and its finished outputs are validated against the whole schema (in the
//! engine, in an agent's turn, and in `troupe generate`), a violation being an error.

mod common;

use std::process::Command;

use serde_json::json;
use troupe::agent::AgentConfig;
use troupe::agent::{Ask, History};
use troupe::engine::{EngineConfig, Generate};
use troupe::grammar::{Grammar, GrammarCompiler};
use troupe::{Error, WeightsMode};

/// Two items, each the constant "a": every output the grammar allows is `["a","a"]`,
/// which breaks `uniqueItems` (dropped from the grammar). Compact (no free
/// whitespace), so the whole output is forced whatever the model.
fn always_violated() -> serde_json::Value {
    json!({"x-guidance": {"whitespace_flexible": false}, "type": "array", "items": {"const": "a"}, "minItems": 2, "maxItems": 2, "uniqueItems": true})
}

fn tags() -> serde_json::Value {
    json!({"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2, "uniqueItems": true})
}

#[test]
fn strict_refuses_naming_the_keyword_and_lenient_checks_it_afterwards() {
    let model = common::tiny(WeightsMode::F32);
    let c = GrammarCompiler::new(model.tokenizer()).unwrap();
    let e = c.compile(&Grammar::StrictJsonSchema(tags())).unwrap_err();
    assert!(e.to_string().contains("uniqueItems"), "{e}");

    let lenient = Grammar::JsonSchema(tags());
    let compiled = c.compile(&lenient).unwrap();
    assert!(compiled
        .dropped()
        .is_some_and(|d| d.contains("uniqueItems")));
    c.check_output(&lenient, r#"["a","b"]"#).unwrap();
    let e = c.check_output(&lenient, r#"["a","a"]"#).unwrap_err();
    assert!(
        matches!(&e, Error::SchemaViolation { violations } if violations.contains("uniqueItems")),
        "{e}"
    );
    // A schema the grammar enforces whole needs no check.
    let whole = Grammar::JsonSchema(json!({"type": "array", "items": {"enum": ["a"]}}));
    assert!(c.compile(&whole).unwrap().dropped().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_and_an_agent_report_a_violation_instead_of_returning_it() {
    let engine = common::engine(common::tiny(WeightsMode::F32), EngineConfig::default());
    let mut g = Generate::new(engine.new_cache(), vec![1, 2, 3], 32);
    g.grammar = Some(Grammar::JsonSchema(always_violated()));
    let err = engine
        .generate(g)
        .await
        .unwrap()
        .finish()
        .await
        .unwrap_err();
    assert!(
        matches!(&err.error, Error::SchemaViolation { violations } if violations.contains("uniqueItems")),
        "{}",
        err.error
    );
    // The cache comes back rolled back to where it was (empty).
    assert_eq!(err.cache.map(|c| c.len()), Some(0));

    let mut config = AgentConfig::new("tagger", "Answer in JSON.");
    config.grammar = Some(Grammar::JsonSchema(always_violated()));
    config.max_tokens = 32;
    let agent = engine.agent(config, Vec::new()).unwrap();
    let before = agent.ask(History).await.unwrap();
    let e = agent.ask(Ask::new("Two tags?")).await.unwrap_err();
    assert!(format!("{e:?}").contains("uniqueItems"), "{e:?}");
    // The failed turn left the conversation as it was.
    assert_eq!(agent.ask(History).await.unwrap(), before);
    engine.stop().await;
}

#[test]
fn troupe_generate_checks_a_lenient_schema_and_strict_schema_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("s.json");
    std::fs::write(&schema, always_violated().to_string()).unwrap();
    let tiny = common::tiny_model_path();
    let run = |extra: &[&str]| {
        Command::new(common::troupe_bin())
            .args([
                "generate",
                "--prompt",
                "Tags?",
                "--max-tokens",
                "32",
                "--model",
            ])
            .arg(&tiny)
            .arg("--json-schema")
            .arg(&schema)
            .args(extra)
            .env_remove("TROUPE_MODEL")
            .output()
            .unwrap()
    };
    let lenient = run(&[]);
    let err = String::from_utf8_lossy(&lenient.stderr);
    assert!(
        !lenient.status.success(),
        "a violating output was accepted: {err}"
    );
    assert!(
        err.contains("violates its JSON Schema") && err.contains("uniqueItems"),
        "{err}"
    );

    let strict = run(&["--strict-schema"]);
    let err = String::from_utf8_lossy(&strict.stderr);
    assert!(!strict.status.success());
    assert!(
        err.contains("uniqueItems") && err.contains("strict"),
        "{err}"
    );
    // Refused before generating: nothing on stdout.
    assert!(strict.stdout.is_empty());
}
