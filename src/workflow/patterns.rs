//! The workflow primitives themselves.

use std::sync::Arc;

use kameo::actor::ActorRef;

use super::{emit, Events, WorkflowEvent};
use crate::agent::{
    ask_error, tool_fn, unreachable, AgentActor, AgentReply, Ask, AskNested, Fork, Tool,
};
use crate::grammar::Grammar;
use crate::{Error, Result};

/// An agent and the name workflows know it by.
#[derive(Clone, Debug)]
pub struct Named {
    /// Its name (what a router or moderator picks).
    pub name: String,
    /// The agent.
    pub agent: ActorRef<AgentActor>,
}

impl Named {
    /// Names an agent.
    pub fn new(name: impl Into<String>, agent: ActorRef<AgentActor>) -> Self {
        Self {
            name: name.into(),
            agent,
        }
    }
}

async fn ask(n: &Named, input: String, events: &Events) -> Result<AgentReply> {
    emit(events, || WorkflowEvent::Asked {
        agent: n.name.clone(),
        input: input.clone(),
    });
    tracing::debug!(agent = %n.name, input_bytes = input.len(), "workflow step: asked");
    let reply = n.agent.ask(Ask::new(input)).await.map_err(ask_error)?;
    tracing::debug!(agent = %n.name, answer_bytes = reply.text.len(), "workflow step: answered");
    emit(events, || WorkflowEvent::Answered {
        agent: n.name.clone(),
        reply: Box::new(reply.clone()),
    });
    Ok(reply)
}

/// Asks `picker` a question whose answer must be one of the agents' names; returns
/// that agent.
async fn pick<'a>(
    picker: &Named,
    question: String,
    agents: &'a [Named],
    events: &Events,
) -> Result<&'a Named> {
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let answer = picker
        .agent
        .ask(Ask::new(question).grammar(Grammar::Choice(names.clone())))
        .await
        .map_err(ask_error)?;
    let chosen = agents
        .iter()
        .find(|a| a.name == answer.text)
        .ok_or_else(|| Error::Pick {
            picker: picker.name.clone(),
            picked: answer.text.clone(),
            choices: format!("{names:?}"),
        })?;
    tracing::debug!(picker = %picker.name, picked = %chosen.name, "workflow step: picked");
    emit(events, || WorkflowEvent::Picked {
        agent: chosen.name.clone(),
    });
    Ok(chosen)
}

/// Each agent's answer becomes the next agent's input; returns the last answer.
pub async fn pipeline(agents: &[Named], input: &str, events: &Events) -> Result<String> {
    let mut text = input.to_string();
    for a in agents {
        text = ask(a, text, events).await?.text;
    }
    Ok(text)
}

/// Sends one task to every agent at once (their requests batch together in the model
/// actor); returns the answers in the agents' order.
pub async fn fan_out(
    agents: &[Named],
    task: &str,
    events: &Events,
) -> Result<Vec<(String, AgentReply)>> {
    let futures = agents.iter().map(|a| {
        let (a, task, events) = (a.clone(), task.to_string(), events.clone());
        async move { ask(&a, task, &events).await.map(|r| (a.name.clone(), r)) }
    });
    futures::future::join_all(futures)
        .await
        .into_iter()
        .collect()
}

/// Reduces fanned-out answers with another agent: it gets the task and every answer.
pub async fn gather(
    reducer: &Named,
    task: &str,
    answers: &[(String, AgentReply)],
    events: &Events,
) -> Result<String> {
    let mut prompt = format!("Task: {task}\nAnswers:\n");
    for (name, r) in answers {
        prompt.push_str(&format!("- {name}: {}\n", r.text));
    }
    prompt.push_str("Combine them into one answer.");
    Ok(ask(reducer, prompt, events).await?.text)
}

/// A router agent picks which agent takes the input (its answer is constrained to
/// the agents' names); the chosen agent answers. Returns the name and the reply.
pub async fn route(
    router: &Named,
    agents: &[Named],
    input: &str,
    events: &Events,
) -> Result<(String, AgentReply)> {
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    let question = format!("Which of {} should handle this? {input}", names.join(", "));
    let chosen = pick(router, question, agents, events).await?;
    let reply = ask(chosen, input.to_string(), events).await?;
    Ok((chosen.name.clone(), reply))
}

/// Who speaks next in a group chat.
#[derive(Clone, Debug)]
pub enum Speaker {
    /// Each agent in turn.
    RoundRobin,
    /// A moderator agent picks the next speaker by name.
    Moderator(Named),
}

/// A test on a group-chat message that ends the chat when it returns true.
pub type StopWhen = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// When a group chat ends.
#[derive(Clone, Default)]
pub struct Termination {
    /// A message containing this phrase ends it.
    pub phrase: Option<String>,
    /// At most this many messages (0: no limit).
    pub max_rounds: usize,
    /// Ends it when this returns true for a message.
    pub predicate: Option<StopWhen>,
}

impl std::fmt::Debug for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Termination")
            .field("phrase", &self.phrase)
            .field("max_rounds", &self.max_rounds)
            .field("predicate", &self.predicate.is_some())
            .finish()
    }
}

/// A group chat's settings.
#[derive(Clone, Debug)]
pub struct GroupChat {
    /// The participants.
    pub agents: Vec<Named>,
    /// Turn order.
    pub speaker: Speaker,
    /// When to stop.
    pub until: Termination,
}

/// Runs a group chat from an opening message; returns the transcript `(speaker,
/// message)` and why it ended. Each speaker sees the previous message.
pub async fn group_chat(
    chat: &GroupChat,
    opening: &str,
    events: &Events,
) -> Result<(Vec<(String, String)>, String)> {
    if chat.agents.is_empty() {
        return Err(Error::Config {
            what: "a group chat needs agents".into(),
        });
    }
    let names: Vec<String> = chat.agents.iter().map(|a| a.name.clone()).collect();
    let mut transcript = Vec::new();
    let mut last = opening.to_string();
    let mut round = 0;
    let reason = loop {
        if chat.until.max_rounds > 0 && round >= chat.until.max_rounds {
            break format!("{round} rounds");
        }
        let speaker = match &chat.speaker {
            Speaker::RoundRobin => &chat.agents[round % chat.agents.len()],
            Speaker::Moderator(m) => {
                let question = format!(
                    "Who speaks next ({})? Last message: {last}",
                    names.join(", ")
                );
                pick(m, question, &chat.agents, events).await?
            }
        };
        let reply = ask(speaker, last.clone(), events).await?;
        round += 1;
        transcript.push((speaker.name.clone(), reply.text.clone()));
        last = reply.text;
        if let Some(p) = &chat.until.phrase {
            if last.contains(p.as_str()) {
                break format!("phrase {p:?}");
            }
        }
        if let Some(pred) = &chat.until.predicate {
            if pred(&last) {
                break "predicate".to_string();
            }
        }
    };
    emit(events, || WorkflowEvent::Ended {
        reason: reason.clone(),
    });
    Ok((transcript, reason))
}

/// Exposes an agent as a tool another agent can call: the tool's argument is the
/// message, its result the agent's answer.
///
/// The ask carries the chain of agents whose tool calls led to it: a call that would
/// ask an agent of that chain (A asks B asks A, or A asks itself) is refused with
/// [`Error::ToolCycle`] instead of waiting on itself until the timeout. When the
/// calling tool times out (its task is aborted), the asked agent skips the turn if it
/// has not started, or stops it at its next step.
pub fn agent_tool(name: &str, description: &str, agent: ActorRef<AgentActor>) -> Arc<dyn Tool> {
    let tool_name = name.to_string();
    tool_fn(name, description, move |args: AgentToolArgs| {
        let agent = agent.clone();
        let tool_name = tool_name.clone();
        async move {
            let asked_by = crate::agent::tool_callers();
            if asked_by.contains(&agent.id()) {
                let mut chain: Vec<String> =
                    asked_by.iter().map(|id| format!("agent {id}")).collect();
                chain.push(format!("agent {} (via tool `{tool_name}`)", agent.id()));
                return Err(Error::ToolCycle {
                    chain: chain.join(" -> "),
                }
                .to_string());
            }
            // Held while waiting: dropped when this task is aborted.
            let (_alive, asker_alive) = tokio::sync::oneshot::channel::<()>();
            agent
                .ask(AskNested {
                    text: args.message,
                    asked_by,
                    asker_alive,
                })
                .await
                .map(|r| r.text)
                .map_err(|e| ask_error(e).to_string())
        }
    })
}

/// What an agent called as a tool is given.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AgentToolArgs {
    // The message for the agent (a plain comment: a doc comment would become a schema
    // description, and so text in the tools prompt).
    #[schemars(length(max = 200))]
    message: String,
}

/// Forks `agent` `n` times from its current state (the shared prefix is never
/// recomputed), each fork with its own sampling seed ([`Fork::seed_offset`]), asks each fork
/// the task, and returns the best answer by `score` with the index of its fork. The
/// forks differ only if the agent samples at a temperature above zero.
pub async fn fork_explore(
    agent: &ActorRef<AgentActor>,
    n: usize,
    task: &str,
    score: impl Fn(&AgentReply) -> f64,
    events: &Events,
) -> Result<(usize, AgentReply)> {
    let mut forks = Vec::with_capacity(n);
    for i in 0..n {
        let child = agent
            .ask(Fork {
                seed_offset: i as u64 + 1,
            })
            .await
            .map_err(unreachable)?;
        forks.push(Named::new(format!("fork-{i}"), child));
    }
    let answers = fan_out(&forks, task, events).await?;
    // Each answer is scored once.
    answers
        .into_iter()
        .enumerate()
        .map(|(i, (_, r))| (score(&r), i, r))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, i, r)| (i, r))
        .ok_or_else(|| Error::Config {
            what: "fork_explore needs n >= 1".into(),
        })
}
