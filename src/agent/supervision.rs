//! Supervision: a supervised agent that crashes (panics or is killed) restarts from
//! its last completed turn. The checkpoint lives outside the actor; each completed
//! turn writes it, and the restarted agent rebuilds its conversation from it (its
//! cache is re-prefilled on the next turn: a crash may have left it half-written).

use std::sync::{Arc, Mutex};

use kameo::actor::{ActorRef, Spawn};
use kameo::Actor;

use super::{AgentActor, AgentStats, Conversation};
use crate::model::Message;

/// The messages and token log of an agent's last completed turn, shared with its
/// supervisor's restarts.
pub(super) type CheckpointCell = Arc<Mutex<Checkpoint>>;

/// What a restarted agent resumes from.
#[derive(Debug, Clone, Default)]
pub(super) struct Checkpoint {
    messages: Vec<Message>,
    log: Vec<u32>,
}

/// A supervisor for agents: spawn it once, then hand it to
/// [`AgentActor::spawn_supervised`].
#[derive(Debug, Default)]
pub struct AgentSupervisor;

impl Actor for AgentSupervisor {
    type Args = ();
    type Error = std::convert::Infallible;

    async fn on_start(_: (), _: ActorRef<Self>) -> std::result::Result<Self, Self::Error> {
        Ok(AgentSupervisor)
    }
}

impl AgentActor {
    /// Spawns the agent under `supervisor`: if it crashes (panics or is killed), it
    /// restarts from its last completed turn (conversation and token log; the cache is
    /// re-prefilled on the next turn). The actor reference stays valid across restarts.
    pub async fn spawn_supervised(
        mut self,
        supervisor: &ActorRef<AgentSupervisor>,
    ) -> ActorRef<AgentActor> {
        let checkpoint = Arc::new(Mutex::new(Checkpoint {
            messages: self.conv.messages().to_vec(),
            log: self.conv.log().to_vec(),
        }));
        self.checkpoint = Some(checkpoint.clone());
        let (config, engine, tools, mcp) = (
            self.config.clone(),
            self.engine.clone(),
            self.tools.clone(),
            self.mcp.clone(),
        );
        // The first incarnation is this agent (with its cache); later ones are rebuilt
        // from the checkpoint.
        let first = Mutex::new(Some(self));
        let factory = move || {
            if let Some(a) = first.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return a;
            }
            let cp = checkpoint.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let conv = Conversation::restore(engine.model(), cp.messages.clone(), cp.log.clone())
                .unwrap_or_else(|e| {
                    // The log came from this model: decoding it cannot fail short of
                    // a broken tokenizer. Start from the messages alone, then.
                    tracing::error!("restoring the checkpoint's log failed ({e}); re-rendering");
                    Conversation::new(cp.messages)
                });
            AgentActor {
                config: config.clone(),
                engine: engine.clone(),
                tools: tools.clone(),
                conv,
                holder: None,
                stats: AgentStats::default(),
                checkpoint: Some(checkpoint.clone()),
                turn_state: Default::default(),
                mcp: mcp.clone(),
            }
        };
        AgentActor::supervise_with(supervisor, factory)
            .restart_policy(kameo::supervision::RestartPolicy::Transient)
            .spawn()
            .await
    }

    /// Records the state after a completed turn (or a reset) for restarts.
    pub(super) fn save_checkpoint(&self) {
        if let Some(cp) = &self.checkpoint {
            *cp.lock().unwrap_or_else(|p| p.into_inner()) = Checkpoint {
                messages: self.conv.messages().to_vec(),
                log: self.conv.log().to_vec(),
            };
        }
    }
}
