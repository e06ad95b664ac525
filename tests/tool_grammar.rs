//! The tool-choice grammar itself, checked with llguidance matchers fed whole replies:
//! `none` refuses any call, a named tool refuses another tool's call, `required`
//! refuses prose, `auto` takes either, arguments must match the tool's schema, and an
//! answer grammar narrows the prose.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;
use troupe::agent::{format_call, reply_grammar, tool_fn, CallFormat, Tool, ToolChoice};
use troupe::grammar::Grammar;
use troupe::model::{Model, WeightsMode};

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[allow(dead_code)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[allow(dead_code)]
struct EchoArgs {
    text: String,
}

fn tools() -> Vec<Arc<dyn Tool>> {
    vec![
        tool_fn("add", "Adds.", |a: AddArgs| async move {
            Ok((a.a + a.b).to_string())
        }),
        tool_fn("echo", "Echoes.", |a: EchoArgs| async move { Ok(a.text) }),
    ]
}

/// Whether the grammar of a reply under `choice` accepts `reply` whole.
fn accepts(model: &Model, choice: &ToolChoice, answer: Option<&Grammar>, reply: &str) -> bool {
    let g = reply_grammar(&tools(), choice, answer, CallFormat::Troupe)
        .unwrap()
        .expect("tools make a grammar");
    let compiled = troupe::grammar::GrammarCompiler::new(model.tokenizer())
        .unwrap()
        .compile(&g)
        .unwrap();
    compiled
        .constraint()
        .accepts_tokens(&model.tokenizer().encode(reply).unwrap())
}

/// `check(choice, answer grammar, reply, accepted)` for each case.
fn check(cases: &[(ToolChoice, Option<Grammar>, &str, bool)]) {
    let model = tiny(WeightsMode::Native);
    for (choice, answer, reply, expected) in cases {
        assert_eq!(
            accepts(&model, choice, answer.as_ref(), reply),
            *expected,
            "{choice:?} with answer grammar {answer:?} on {reply:?}"
        );
    }
}

#[test]
fn the_tool_choice_decides_what_a_reply_may_be() {
    let add = format_call("add", &json!({"a": 2, "b": 3}));
    let echo = format_call("echo", &json!({"text": "hi"}));
    let prose = "The sum is 5.";
    let named = |n: &str| ToolChoice::Tool(n.into());
    use ToolChoice::{Auto, None, Required};
    check(&[
        // `none`: prose only.
        (None, Option::None, prose, true),
        (None, Option::None, &add, false),
        (None, Option::None, &echo, false),
        // A named tool: its call only.
        (named("add"), Option::None, &add, true),
        (named("add"), Option::None, &echo, false),
        (named("add"), Option::None, prose, false),
        (named("echo"), Option::None, &echo, true),
        (named("echo"), Option::None, &add, false),
        // `required`: any tool's call, no prose.
        (Required, Option::None, &add, true),
        (Required, Option::None, &echo, true),
        (Required, Option::None, prose, false),
        // `auto`: either.
        (Auto, Option::None, &add, true),
        (Auto, Option::None, prose, true),
    ]);
}

#[test]
fn calls_follow_the_tools_schema_and_answers_the_answer_grammar() {
    use ToolChoice::{Auto, None, Required};
    let digits = Some(Grammar::Regex("[0-9]+".into()));
    let call = |name: &str, args: serde_json::Value| format_call(name, &args);
    check(&[
        // Arguments: the right fields of the right types, nothing else, and a known tool.
        (
            Required,
            Option::None,
            &call("add", json!({"a": 1, "b": 2})),
            true,
        ),
        (
            Required,
            Option::None,
            &call("add", json!({"a": "1", "b": 2})),
            false,
        ),
        (Required, Option::None, &call("add", json!({"a": 1})), false),
        (
            Required,
            Option::None,
            &call("add", json!({"a": 1, "b": 2, "c": 3})),
            false,
        ),
        (
            Required,
            Option::None,
            &call("echo", json!({"a": 1, "b": 2})),
            false,
        ),
        (
            Required,
            Option::None,
            &call("mul", json!({"a": 1, "b": 2})),
            false,
        ),
        // An answer grammar narrows the prose, not the calls.
        (None, digits.clone(), "42", true),
        (None, digits.clone(), "forty-two", false),
        (Auto, digits.clone(), "42", true),
        (Auto, digits.clone(), "forty-two", false),
        (
            Auto,
            digits.clone(),
            &call("add", json!({"a": 40, "b": 2})),
            true,
        ),
        (None, digits, &call("add", json!({"a": 40, "b": 2})), false),
    ]);
}

#[test]
fn a_named_tool_must_exist_and_a_lark_answer_grammar_cannot_join_tools() {
    let e = reply_grammar(
        &tools(),
        &ToolChoice::Tool("mul".into()),
        None,
        CallFormat::Troupe,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown tool `mul`"), "{e}");
    let e = reply_grammar(
        &tools(),
        &ToolChoice::Auto,
        Some(&Grammar::Lark("start: \"x\"".into())),
        CallFormat::Troupe,
    )
    .unwrap_err();
    assert!(e.to_string().contains("Lark"), "{e}");
    // Without tools the answer grammar is the whole grammar.
    let g = Grammar::Regex("[a-z]+".into());
    assert_eq!(
        reply_grammar(&[], &ToolChoice::Auto, Some(&g), CallFormat::Troupe).unwrap(),
        Some(g)
    );
}
