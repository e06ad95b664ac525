//! The spans of one two-turn agent conversation with a tool call form the tree a
//! reader expects: turn -> model_call -> admission -> step, the tool call inside
//! its turn between two model calls, and the turn's fields equal to the reply's
//! usage. (One test in this binary: it installs the global subscriber.)

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;
use troupe::agent::{tool_fn, AgentActor, AgentConfig, Ask, ToolChoice};
use troupe::engine::Engine;
use troupe::model::WeightsMode;

/// A captured span: its name, parent, fields, and when it opened and closed (a
/// global sequence number, so that order is exact).
#[derive(Clone, Debug, Default)]
struct Captured {
    name: String,
    parent: Option<u64>,
    fields: HashMap<String, String>,
    opened: u64,
    closed: u64,
}

#[derive(Default)]
struct Log {
    spans: HashMap<u64, Captured>,
    clock: u64,
}

struct Capture(Arc<Mutex<Log>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent().map(|p| p.id().into_u64()));
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut log = self.0.lock().unwrap();
        log.clock += 1;
        let opened = log.clock;
        log.spans.insert(
            id.into_u64(),
            Captured {
                name: attrs.metadata().name().into(),
                parent,
                fields,
                opened,
                closed: 0,
            },
        );
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut log = self.0.lock().unwrap();
        if let Some(s) = log.spans.get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut s.fields));
        }
    }
    fn on_close(&self, id: Id, _: Context<'_, S>) {
        let mut log = self.0.lock().unwrap();
        log.clock += 1;
        let now = log.clock;
        if let Some(s) = log.spans.get_mut(&id.into_u64()) {
            s.closed = now;
        }
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_traces_as_turns_model_calls_admissions_and_steps() {
    let log = Arc::new(Mutex::new(Log::default()));
    let subscriber = tracing_subscriber::registry()
        .with(Capture(log.clone()).with_filter(tracing_subscriber::EnvFilter::new("troupe=debug")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let model = Arc::new(real(WeightsMode::Auto));
    let engine = Engine::serve(model.clone(), engine_config(256, 8, usize::MAX)).unwrap();
    let add = tool_fn("add", "Adds two integers.", |a: AddArgs| async move {
        Ok(format!("{}", a.a + a.b))
    });
    let agent = AgentActor::new(
        AgentConfig {
            max_tokens: 32,
            max_tool_steps: 1,
            ..AgentConfig::new("calc", "You are a calculator. Use the tools.")
        },
        engine,
        vec![add],
    )
    .unwrap()
    .spawn_agent();
    let first = agent
        .ask(
            troupe::agent::Ask::new("What is 17 + 25?").tool_choice(ToolChoice::Tool("add".into())),
        )
        .await
        .unwrap();
    assert_eq!(first.tool_runs.len(), 1, "{first:?}");
    let second = agent.ask(Ask::new("And 2 + 2?")).await.unwrap();
    drop(agent);

    let log = log.lock().unwrap();
    let spans = &log.spans;
    let children = |id: u64, name: &str| -> Vec<(u64, Captured)> {
        let mut v: Vec<(u64, Captured)> = spans
            .iter()
            .filter(|(_, s)| s.parent == Some(id) && s.name == name)
            .map(|(i, s)| (*i, s.clone()))
            .collect();
        v.sort_by_key(|(_, s)| s.opened);
        v
    };
    let mut turns: Vec<(u64, Captured)> = spans
        .iter()
        .filter(|(_, s)| s.name == "turn")
        .map(|(i, s)| (*i, s.clone()))
        .collect();
    turns.sort_by_key(|(_, s)| s.opened);
    assert_eq!(turns.len(), 2, "{turns:?}");
    for ((id, turn), reply) in turns.iter().zip([&first, &second]) {
        assert_eq!(turn.fields["agent"], "calc");
        assert_eq!(turn.fields["reused"], reply.usage.cached_tokens.to_string());
        assert_eq!(
            turn.fields["computed"],
            reply.usage.computed_tokens.to_string()
        );
        assert_eq!(turn.fields["tool_calls"], reply.tool_runs.len().to_string());
        let calls = children(*id, "model_call");
        assert!(!calls.is_empty(), "a turn without a model call");
        for (call_id, _) in &calls {
            let admissions = children(*call_id, "admission");
            assert_eq!(admissions.len(), 1, "one engine request per model call");
            let (adm_id, adm) = &admissions[0];
            assert_eq!(adm.fields["agent"], "calc");
            assert!(adm.fields.contains_key("queue_ms"), "{adm:?}");
            let steps = children(*adm_id, "step");
            assert!(!steps.is_empty(), "an admission without steps");
        }
    }
    // The tool call sits inside the first turn, after its first model call opened
    // and before its second opened. (A model call's span closes once the engine
    // drops its admission and step spans too, which may be just after the agent
    // has moved on, so its close is not an order the test can rely on.)
    let (first_id, _) = &turns[0];
    let calls = children(*first_id, "model_call");
    assert_eq!(calls.len(), 2, "call, then answer: {calls:?}");
    let tools = children(*first_id, "tool_call");
    assert_eq!(tools.len(), 1);
    let tool = &tools[0].1;
    assert_eq!(tool.fields["tool"], "add");
    assert_eq!(tool.fields["outcome"], "ok");
    assert!(calls[0].1.opened < tool.opened && tool.closed < calls[1].1.opened);
    assert!(children(turns[1].0, "tool_call").is_empty());
    // The engine's own step spans list the agent.
    let engine_steps: Vec<&Captured> = spans.values().filter(|s| s.name == "engine_step").collect();
    assert!(!engine_steps.is_empty());
    assert!(engine_steps.iter().all(|s| s.fields["agents"] == "calc"));
}
