//! Workflow primitives, checked on the message flow: who received what, in which
//! order, that a fan-out's requests shared steps, and that group chats end on their
//! termination conditions.

mod common;

use std::sync::Arc;

use common::*;
use troupe::agent::{AgentActor, AgentConfig, History, ToolChoice};
use troupe::engine::Engine;
use troupe::model::{Model, Role, WeightsMode};
use troupe::workflow::*;

fn setup() -> (Arc<Model>, Engine) {
    let model = Arc::new(tiny(WeightsMode::Native));
    let engine = Engine::serve(model.clone(), engine_config(256, 16, usize::MAX)).unwrap();
    (model, engine)
}

fn named(engine: &Engine, name: &str) -> Named {
    let cfg = AgentConfig {
        max_tokens: 5,
        ..AgentConfig::new(name, format!("You are {name}."))
    };
    Named::new(
        name,
        AgentActor::new(cfg, engine.clone(), vec![])
            .unwrap()
            .spawn_agent(),
    )
}

fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<WorkflowEvent>) -> Vec<WorkflowEvent> {
    let mut v = Vec::new();
    while let Ok(e) = rx.try_recv() {
        v.push(e);
    }
    v
}

async fn user_messages(a: &Named) -> Vec<String> {
    a.agent
        .ask(History)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_passes_each_answer_on_in_order() {
    let (_, e) = setup();
    let agents: Vec<Named> = ["a", "b", "c"].iter().map(|n| named(&e, n)).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = pipeline(&agents, "start", &Some(tx)).await.unwrap();
    let evs = collect(&mut rx);
    let mut expected_input = "start".to_string();
    let mut order = Vec::new();
    for ev in &evs {
        match ev {
            WorkflowEvent::Asked { agent, input } => {
                assert_eq!(input, &expected_input, "{agent} got the previous answer");
                order.push(agent.clone());
            }
            WorkflowEvent::Answered { reply, .. } => expected_input = reply.text.clone(),
            _ => {}
        }
    }
    assert_eq!(order, ["a", "b", "c"]);
    assert_eq!(out, expected_input);
    assert_eq!(user_messages(&agents[1]).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_batches_and_gather_sees_every_answer() {
    let (_, e) = setup();
    let agents: Vec<Named> = (0..6).map(|i| named(&e, &format!("w{i}"))).collect();
    let answers = fan_out(&agents, "the task", &None).await.unwrap();
    assert_eq!(
        answers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["w0", "w1", "w2", "w3", "w4", "w5"]
    );
    let stats = e.stats().await.unwrap();
    assert!(
        stats.max_batch() >= 6,
        "the six requests shared steps: {stats:?}"
    );
    let reducer = named(&e, "reducer");
    gather(&reducer, "the task", &answers, &None).await.unwrap();
    let seen = user_messages(&reducer).await;
    for (name, r) in &answers {
        assert!(
            seen[0].contains(&format!("- {name}: {}", r.text)),
            "{}",
            seen[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_hands_the_input_to_the_agent_it_picks() {
    let (_, e) = setup();
    let agents: Vec<Named> = ["billing", "support", "sales"]
        .iter()
        .map(|n| named(&e, n))
        .collect();
    let router = named(&e, "router");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (chosen, _) = route(&router, &agents, "my invoice is wrong", &Some(tx))
        .await
        .unwrap();
    assert!(["billing", "support", "sales"].contains(&chosen.as_str()));
    for a in &agents {
        let got = user_messages(a).await;
        assert_eq!(
            got == vec!["my invoice is wrong".to_string()],
            a.name == chosen,
            "{}",
            a.name
        );
    }
    assert!(collect(&mut rx)
        .iter()
        .any(|ev| matches!(ev, WorkflowEvent::Picked { agent } if *agent == chosen)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_chats_stop_on_their_conditions() {
    let (_, e) = setup();
    let agents: Vec<Named> = ["x", "y"].iter().map(|n| named(&e, n)).collect();
    let chat = GroupChat {
        agents: agents.clone(),
        speaker: Speaker::RoundRobin,
        until: Termination {
            max_rounds: 5,
            ..Default::default()
        },
    };
    let (t, why) = group_chat(&chat, "hello", &None).await.unwrap();
    assert_eq!(
        t.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["x", "y", "x", "y", "x"]
    );
    assert_eq!(why, "5 rounds");
    // Each speaker received the previous message.
    assert_eq!(user_messages(&agents[1]).await[0], t[0].1);
    // A predicate that fires at once; a phrase from the first reply.
    let fresh: Vec<Named> = ["p", "q"].iter().map(|n| named(&e, n)).collect();
    let chat = GroupChat {
        agents: fresh.clone(),
        speaker: Speaker::RoundRobin,
        until: Termination {
            max_rounds: 10,
            predicate: Some(Arc::new(|_: &str| true)),
            ..Default::default()
        },
    };
    let (t, why) = group_chat(&chat, "hello", &None).await.unwrap();
    assert_eq!((t.len(), why.as_str()), (1, "predicate"));
    // The same agent given the same opening writes the same first reply: a phrase
    // from it ends a chat after one round.
    let phrase: String = t[0].1.chars().take(3).collect();
    assert!(!phrase.is_empty(), "{t:?}");
    let again: Vec<Named> = ["p", "q"].iter().map(|n| named(&e, n)).collect();
    let chat = GroupChat {
        agents: again,
        speaker: Speaker::RoundRobin,
        until: Termination {
            max_rounds: 10,
            phrase: Some(phrase.clone()),
            ..Default::default()
        },
    };
    let (t, why) = group_chat(&chat, "hello", &None).await.unwrap();
    assert_eq!((t.len(), why), (1, format!("phrase {phrase:?}")));
    // A moderator picks every speaker.
    let others: Vec<Named> = ["r", "s"].iter().map(|n| named(&e, n)).collect();
    let chat = GroupChat {
        agents: others,
        speaker: Speaker::Moderator(named(&e, "mod")),
        until: Termination {
            max_rounds: 3,
            ..Default::default()
        },
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (t, why) = group_chat(&chat, "hello", &Some(tx)).await.unwrap();
    assert_eq!((t.len(), why.as_str()), (3, "3 rounds"));
    let picks = collect(&mut rx)
        .iter()
        .filter(|e| matches!(e, WorkflowEvent::Picked { .. }))
        .count();
    assert_eq!(picks, t.len(), "the moderator picked every speaker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_can_be_another_agents_tool() {
    // The default model: the tool prompt and a call fit its context comfortably.
    let m = Arc::new(real(WeightsMode::Native));
    let e = Engine::serve(m.clone(), engine_config(256, 16, usize::MAX)).unwrap();
    let helper = named(&e, "helper");
    let cfg = AgentConfig {
        max_tokens: 120,
        max_tool_steps: 1,
        tool_choice: ToolChoice::Tool("helper".into()),
        ..AgentConfig::new("boss", "Delegate.")
    };
    let boss = AgentActor::new(
        cfg,
        e.clone(),
        vec![agent_tool(
            "helper",
            "Asks the helper.",
            helper.agent.clone(),
        )],
    )
    .unwrap()
    .spawn_agent();
    let r = boss.ask(troupe::agent::Ask::new("do it")).await.unwrap();
    assert_eq!(r.tool_runs.len(), 1);
    let run = &r.tool_runs[0];
    assert!(!run.failed, "{run:?}");
    let asked = user_messages(&helper).await;
    assert_eq!(asked.len(), 1);
    assert_eq!(
        serde_json::Value::String(asked[0].clone()),
        run.call.arguments["message"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_explore_keeps_the_best_and_reuses_the_prefix() {
    let (_, e) = setup();
    // Sampling at a temperature (high: the tiny random model is very peaked), each fork
    // gets its own seed and writes its own answer.
    let cfg = AgentConfig {
        max_tokens: 8,
        sampling: troupe::sampling::SamplingParams::with_temperature(50.0, 7),
        ..AgentConfig::new("base", "You are base.")
    };
    let base = Named::new(
        "base",
        AgentActor::new(cfg, e.clone(), vec![])
            .unwrap()
            .spawn_agent(),
    );
    base.agent
        .ask(troupe::agent::Ask::new("some shared context"))
        .await
        .unwrap();
    // Distinct scores, the best in the middle (neither the first nor the last fork), so
    // neither a tie nor a wrong pick by position can pass.
    let texts = std::sync::Mutex::new(Vec::new());
    let (best, reply) = fork_explore(
        &base.agent,
        3,
        "try",
        |r| {
            let mut texts = texts.lock().unwrap();
            texts.push(r.text.clone());
            [1.0, 3.0, 2.0][texts.len() - 1]
        },
        &None,
    )
    .await
    .unwrap();
    assert_eq!(best, 1, "the fork with the highest score");
    assert_eq!(reply.text, texts.lock().unwrap()[1], "and its reply");
    let texts = texts.lock().unwrap().clone();
    assert_eq!(texts.len(), 3);
    assert!(
        texts.iter().any(|t| t != &texts[0]),
        "forks with their own seeds diverge: {texts:?}"
    );
    assert!(
        reply.usage.cached_tokens > 0,
        "the fork reused the shared prefix"
    );
    // The base agent was not changed by its forks.
    assert_eq!(
        user_messages(&base).await,
        vec!["some shared context".to_string()]
    );
}
