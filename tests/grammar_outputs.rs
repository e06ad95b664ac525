//! Grammars constrain real outputs: JSON Schema outputs validate, regex outputs
//! full-match, choices are one of the options, Lark outputs parse; a mixed batch of
//! grammars equals each request alone; compilation is cached; bad grammars fail at
//! configuration; a grammar failing mid-generation ends only its own sequence.

mod common;

use common::*;
use serde_json::json;
use troupe::engine::{Event, FinishReason, Generate, GetStats, TokenConstraint};
use troupe::grammar::{Grammar, GrammarCompiler};
use troupe::model::{Message, Model, WeightsMode};
use troupe::sampling::SamplingParams;
use troupe::Error;

fn chat(model: &Model, user: &str) -> Vec<u32> {
    let text = model
        .chat_template()
        .render(&[Message::user(user)], true)
        .unwrap();
    model.tokenizer().encode_prompt(&text).unwrap()
}

fn schemas() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "a person",
            json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "a nested address",
            json!({"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 16},
            "location": {"type": "object", "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                "required": ["lat", "lon"], "additionalProperties": false}},
            "required": ["city", "location"], "additionalProperties": false}),
        ),
        (
            "a list of tags",
            json!({"type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                     "minItems": 1, "maxItems": 3}},
            "required": ["tags"], "additionalProperties": false}),
        ),
        (
            "a color",
            json!({"type": "object", "properties": {
            "color": {"enum": ["red", "green", "blue"]}},
            "required": ["color"], "additionalProperties": false}),
        ),
        (
            "a score",
            json!({"type": "object", "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
            "required": ["score"], "additionalProperties": false}),
        ),
        (
            "a product code",
            json!({"type": "object", "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
            "required": ["code"], "additionalProperties": false}),
        ),
        (
            "a meeting date",
            json!({"type": "object", "properties": {
            "date": {"type": "string", "format": "date"}},
            "required": ["date"], "additionalProperties": false}),
        ),
        (
            "a user with an optional email",
            json!({"type": "object", "properties": {
            "user": {"type": "string", "maxLength": 12},
            "email": {"type": "string", "format": "email", "maxLength": 30},
            "admin": {"type": "boolean"}},
            "required": ["user"], "additionalProperties": false}),
        ),
        (
            "an id that is a number or a word",
            json!({"type": "object", "properties": {
            "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999},
                             {"type": "string", "maxLength": 8}]}},
            "required": ["id"], "additionalProperties": false}),
        ),
        (
            "two points",
            json!({
            "$defs": {"point": {"type": "object", "properties": {
                "x": {"type": "integer", "minimum": -100, "maximum": 100},
                "y": {"type": "integer", "minimum": -100, "maximum": 100}},
                "required": ["x", "y"], "additionalProperties": false}},
            "type": "object", "properties": {
                "from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
            "required": ["from", "to"], "additionalProperties": false}),
        ),
        (
            "a short yes or no answer",
            json!({"type": "object", "properties": {
            "answer": {"type": "boolean"},
            "reasons": {"type": "array", "items": {"enum": ["cost", "time", "risk"]}, "maxItems": 2}},
            "required": ["answer", "reasons"], "additionalProperties": false}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_outputs_validate_against_their_schemas() {
    let model = real(WeightsMode::Auto);
    let mut reqs = Vec::new();
    for (what, schema) in schemas() {
        for seed in 1..=3u64 {
            let mut g = Generate::new(
                cache(&model),
                chat(&model, &format!("Reply with JSON describing {what}.")),
                96,
            );
            g.grammar = Some(Grammar::JsonSchema(schema.clone()));
            g.sampling = SamplingParams::with_temperature(0.7, seed);
            reqs.push((what, schema.clone(), g));
        }
    }
    let a = actor(model, engine_config(512, 64, usize::MAX));
    let mut streams = Vec::new();
    for (what, schema, g) in reqs {
        streams.push((what, schema, a.ask(g).await.unwrap()));
    }
    let mut finished_by_grammar = std::collections::HashMap::new();
    for (what, schema, s) in streams {
        let done = s.finish().await.unwrap();
        if done.finish == FinishReason::Grammar {
            let value: serde_json::Value = serde_json::from_str(&done.text)
                .unwrap_or_else(|e| panic!("{what}: {:?} is not JSON: {e}", done.text));
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(&schema)
                .unwrap();
            assert!(
                validator.is_valid(&value),
                "{what}: {value} does not validate"
            );
            *finished_by_grammar.entry(what).or_insert(0) += 1;
        }
    }
    for (what, _) in schemas() {
        assert!(
            finished_by_grammar.contains_key(what),
            "no output for {what} completed its grammar"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_choice_and_lark_outputs_conform() {
    let model = real(WeightsMode::Auto);
    // Bounded (at most five short items), so that a sample ends inside 64 tokens.
    let lark = r#"
start: item ("," " "? item){0,4}
item: /[a-z]{1,12}/ | NUMBER
NUMBER: /[0-9]{1,3}/
"#;
    // The same language as a regex: an oracle independent of llguidance.
    let lark_oracle =
        regex::Regex::new(r"^(?:[a-z]{1,12}|[0-9]{1,3})(?:, ?(?:[a-z]{1,12}|[0-9]{1,3})){0,4}$")
            .unwrap();
    let cases = vec![
        (
            Grammar::Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}".into()),
            "Give a date.",
        ),
        (
            Grammar::Regex(r"(yes|no), because [a-z ]{1,30}\.".into()),
            "Is water wet?",
        ),
        (
            Grammar::Choice(vec!["red".into(), "green".into(), "blue".into()]),
            "Pick a color.",
        ),
        (
            Grammar::Choice(vec!["Paris".into(), "Lyon".into(), "Rome".into()]),
            "What is the capital of France?",
        ),
        (Grammar::Lark(lark.into()), "List three fruits."),
    ];
    let mut reqs = Vec::new();
    for (g, prompt) in &cases {
        for seed in 1..=2u64 {
            let mut r = Generate::new(cache(&model), chat(&model, prompt), 64);
            r.grammar = Some(g.clone());
            r.sampling = SamplingParams::with_temperature(0.7, seed);
            reqs.push((g.clone(), r));
        }
    }
    let a = actor(model, engine_config(512, 64, usize::MAX));
    let mut streams = Vec::new();
    for (g, r) in reqs {
        streams.push((g, a.ask(r).await.unwrap()));
    }
    let mut completed = 0;
    let mut kinds_checked = std::collections::BTreeSet::new();
    for (g, s) in streams {
        let done = s.finish().await.unwrap();
        if done.finish != FinishReason::Grammar {
            assert_eq!(done.finish, FinishReason::Length, "{g:?}");
            continue;
        }
        completed += 1;
        kinds_checked.insert(match &g {
            Grammar::Regex(_) => "regex",
            Grammar::Choice(_) => "choice",
            Grammar::Lark(_) => "lark",
            Grammar::JsonSchema(_) | Grammar::StrictJsonSchema(_) => "json",
        });
        match &g {
            Grammar::Regex(r) => {
                let full = regex::Regex::new(&format!("^(?:{r})$")).unwrap();
                assert!(
                    full.is_match(&done.text),
                    "{:?} does not full-match {r}",
                    done.text
                );
            }
            Grammar::Choice(c) => assert!(c.contains(&done.text), "{:?} not in {c:?}", done.text),
            Grammar::Lark(_) => {
                assert!(
                    lark_oracle.is_match(&done.text),
                    "{:?} is not a list of at most five items",
                    done.text
                );
            }
            Grammar::JsonSchema(_) | Grammar::StrictJsonSchema(_) => unreachable!(),
        }
    }
    assert!(
        completed >= 8,
        "only {completed} of 10 outputs completed their grammar"
    );
    // Each kind's check ran at least once.
    assert_eq!(
        kinds_checked.into_iter().collect::<Vec<_>>(),
        ["choice", "lark", "regex"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_grammars_in_one_batch_equal_each_alone() {
    let make = || real(WeightsMode::Native);
    let model = make();
    let grammars: Vec<Option<Grammar>> = vec![
        Some(Grammar::Regex(r"[0-9]{3}-[0-9]{4}".into())),
        Some(Grammar::Regex(r"[A-Z][a-z]{2,8}".into())),
        Some(Grammar::JsonSchema(schemas()[0].1.clone())),
        Some(Grammar::JsonSchema(schemas()[3].1.clone())),
        Some(Grammar::Lark(
            r#"start: "The answer is " /[0-9]+/ ".""#.into(),
        )),
        Some(Grammar::Lark(r#"start: /[ab]{1,4}/ "!""#.into())),
        Some(Grammar::Choice(vec!["alpha".into(), "beta".into()])),
        Some(Grammar::Choice(vec![
            "up".into(),
            "down".into(),
            "left".into(),
        ])),
        None,
        None,
    ];
    let requests = |model: &Model| -> Vec<Generate> {
        grammars
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let mut r = Generate::new(
                    cache(model),
                    chat(model, &format!("Answer question number {i}.")),
                    // Room for a JSON object with the whitespace the model likes.
                    64,
                );
                r.grammar = g.clone();
                r
            })
            .collect()
    };
    let together_reqs = requests(&model);
    let alone_reqs = requests(&model);
    // Every prompt prefilled in the first steps, even once others decode, so that
    // all ten share steps.
    let mut cfg = engine_config(512, 16, usize::MAX);
    cfg.scheduler.max_prefill_while_decoding = 512;
    let a = actor(model, cfg);
    let mut streams = Vec::new();
    for r in together_reqs {
        streams.push(a.ask(r).await.unwrap());
    }
    let mut together = Vec::new();
    for s in streams {
        together.push(s.finish().await.unwrap());
    }
    let stats = a.ask(GetStats).await.unwrap();
    assert_eq!(stats.max_batch(), 10, "{stats:?}");
    let single = actor(make(), engine_config(512, 1, usize::MAX));
    for (i, r) in alone_reqs.into_iter().enumerate() {
        let alone = single.ask(r).await.unwrap().finish().await.unwrap();
        assert_eq!(
            alone.tokens, together[i].tokens,
            "request {i} ({:?})",
            grammars[i]
        );
        if grammars[i].is_some() {
            assert_eq!(
                together[i].finish,
                FinishReason::Grammar,
                "request {i}: {:?}",
                together[i].text
            );
        }
    }
}

#[test]
fn compiling_the_same_grammar_twice_compiles_once() {
    let model = tiny(WeightsMode::Native);
    let c = GrammarCompiler::new(model.tokenizer()).unwrap();
    let schema = Grammar::JsonSchema(schemas()[1].1.clone());
    for _ in 0..100 {
        c.compile(&schema).unwrap();
    }
    assert_eq!(c.compile_count(), 1);
    c.compile(&Grammar::Regex("[a-z]+".into())).unwrap();
    assert_eq!(c.compile_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grammars_fail_at_configuration_naming_the_problem() {
    let model = tiny(WeightsMode::Native);
    let c = GrammarCompiler::new(model.tokenizer()).unwrap();
    let cases = [
        (Grammar::Regex("(abc".into()), "regex", "unclosed"),
        (
            Grammar::JsonSchema(json!({"type": "foo"})),
            "JSON Schema",
            "foo",
        ),
        (
            Grammar::Lark("start: missing_rule".into()),
            "Lark grammar",
            "missing_rule",
        ),
        (Grammar::Choice(vec![]), "choice", "at least one"),
    ];
    for (g, kind, detail) in &cases {
        let e = c.compile(g).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Grammar { .. }), "{msg}");
        assert!(msg.starts_with(kind), "{msg:?} should name {kind}");
        assert!(msg.contains(detail), "{msg:?} should say {detail:?}");
    }
    // Through the actor: rejected at once, cache handed back.
    // A cache that already holds a conversation comes back unchanged.
    let mut c0 = cache(&model);
    feed(&model, &mut c0, &[1, 2, 3]);
    let a = actor(model, engine_config(64, 4, usize::MAX));
    let mut g = Generate::new(c0, vec![5, 6], 4);
    g.grammar = Some(Grammar::Regex("(abc".into()));
    match a.ask(g).await {
        Err(kameo::error::SendError::HandlerError(r)) => {
            assert!(r.error.to_string().contains("regex"), "{}", r.error);
            assert_eq!(r.cache.len(), 3);
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
}

/// A constraint that allows everything, then fails on its third token.
struct FailsLater(usize);

impl TokenConstraint for FailsLater {
    fn mask(&mut self, _: &mut [f32]) -> troupe::Result<()> {
        Ok(())
    }
    fn commit(&mut self, _: u32) -> troupe::Result<bool> {
        self.0 += 1;
        if self.0 == 3 {
            return Err(Error::Grammar {
                kind: "test",
                message: "no way forward".into(),
            });
        }
        if self.0 == 103 {
            panic!("constraint bug");
        }
        Ok(false)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_failing_mid_generation_ends_only_its_sequence() {
    let model = tiny(WeightsMode::Native);
    let (c1, c2) = (cache(&model), cache(&model));
    let a = actor(model, engine_config(64, 4, usize::MAX));
    let mut bad = Generate::new(c1, tokens(6, 1, 3, 270), 20);
    bad.constraint = Some(Box::new(FailsLater(0)));
    bad.ignore_eos = true;
    let mut good = Generate::new(c2, tokens(6, 2, 3, 270), 20);
    good.ignore_eos = true;
    let mut bad = a.ask(bad).await.unwrap();
    let good = a.ask(good).await.unwrap();
    let err = loop {
        match bad.next().await.unwrap() {
            Event::Failed { error, cache } => {
                assert_eq!(cache.len(), 0, "rolled back");
                break error;
            }
            Event::Done(_) => panic!("should fail"),
            _ => {}
        }
    };
    assert!(err.to_string().contains("no way forward"), "{err}");
    assert_eq!(good.finish().await.unwrap().usage.generated_tokens, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_stretches_are_fed_without_a_decode_step_each() {
    let model = real(WeightsMode::Native);
    let prompt = chat(&model, "Say something.");
    let a = actor(model, engine_config(512, 4, usize::MAX));
    let mut g = Generate::new(cache(&real(WeightsMode::Native)), prompt, 64);
    // After the sampled digit, " is the answer to everything you asked" is forced.
    g.grammar = Some(Grammar::Regex(
        r"[0-9] is the answer to everything you asked".into(),
    ));
    let before = a.ask(GetStats).await.unwrap().steps;
    let done = a.ask(g).await.unwrap().finish().await.unwrap();
    let steps = a.ask(GetStats).await.unwrap().steps - before;
    assert_eq!(done.finish, FinishReason::Grammar);
    assert!(
        done.text
            .ends_with(" is the answer to everything you asked"),
        "{:?}",
        done.text
    );
    assert!(done.tokens.len() >= 6, "{:?}", done.tokens);
    // One prefill step, one step for the digit; the forced rest needs no decode step.
    assert!(steps <= 2, "{steps} steps for {} tokens", done.tokens.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_constraint_fails_only_its_sequence() {
    let model = tiny(WeightsMode::Native);
    let (c1, c2) = (cache(&model), cache(&model));
    let a = actor(model, engine_config(64, 4, usize::MAX));
    let mut bad = Generate::new(c1, tokens(6, 1, 3, 270), 20);
    bad.constraint = Some(Box::new(FailsLater(100)));
    bad.ignore_eos = true;
    let mut good = Generate::new(c2, tokens(6, 2, 3, 270), 20);
    good.ignore_eos = true;
    let bad = a.ask(bad).await.unwrap();
    let good = a.ask(good).await.unwrap();
    let err = bad.finish().await.unwrap_err();
    assert!(err.to_string().contains("constraint bug"), "{err}");
    assert_eq!(good.finish().await.unwrap().usage.generated_tokens, 20);
    // The engine still serves new requests.
    let mut again = Generate::new(cache(&tiny(WeightsMode::Native)), vec![5, 6], 3);
    again.ignore_eos = true;
    assert_eq!(
        a.ask(again)
            .await
            .unwrap()
            .finish()
            .await
            .unwrap()
            .usage
            .generated_tokens,
        3
    );
}
