//! Multi-agent workflows on agent actors: pipelines, fan-out and gather, routing
//! (handoff), group chats, agents as tools, and forked exploration. Each primitive
//! reports its progress as [`WorkflowEvent`]s on an optional channel.

mod patterns;

pub use patterns::{
    agent_tool, fan_out, fork_explore, gather, group_chat, pipeline, route, GroupChat, Named,
    Speaker, StopWhen, Termination,
};

use crate::agent::AgentReply;

/// Progress of a workflow.
#[derive(Clone, Debug)]
pub enum WorkflowEvent {
    /// An agent was given a message.
    Asked {
        /// The agent.
        agent: String,
        /// The message.
        input: String,
    },
    /// An agent answered.
    Answered {
        /// The agent.
        agent: String,
        /// Its reply.
        reply: Box<AgentReply>,
    },
    /// A router or moderator picked an agent.
    Picked {
        /// The agent picked.
        agent: String,
    },
    /// A group chat ended.
    Ended {
        /// Why.
        reason: String,
    },
}

/// Where a workflow sends its events (or nowhere).
pub type Events = Option<tokio::sync::mpsc::UnboundedSender<WorkflowEvent>>;

/// Sends the event `ev` builds, if anyone listens (nothing is built otherwise).
pub(crate) fn emit(events: &Events, ev: impl FnOnce() -> WorkflowEvent) {
    if let Some(tx) = events {
        let _ = tx.send(ev());
    }
}
