//! The server's sessions: each is an agent that keeps a conversation's token log and
//! KV cache between requests. A request names its session (`X-Session-Id`,
//! `metadata.session_id` or `user`), or, naming none, continues the live session
//! whose transcript its messages extend exactly (found by a hash of the transcript
//! after each reply), so a client that resends the whole history computes only the
//! new tokens. Past `max_sessions` the least recently used idle session ends.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use kameo::actor::ActorRef;

use crate::agent::{AgentActor, AgentConfig};
use crate::engine::Engine;
use crate::model::Message;
use crate::Result;

/// Hashes of a transcript's prefixes: `out[i]` covers the first `i + 1` messages.
fn hashes<'a>(messages: impl IntoIterator<Item = &'a Message>) -> Vec<u64> {
    let mut h = DefaultHasher::new();
    messages
        .into_iter()
        .map(|m| {
            (m.role as u8).hash(&mut h);
            m.content.hash(&mut h);
            h.finish()
        })
        .collect()
}

/// Hashes of a transcript's prefixes: `out[i]` covers `messages[..=i]`.
pub fn prefix_hashes(messages: &[Message]) -> Vec<u64> {
    hashes(messages)
}

/// The hash of `messages` followed by `reply` (what the client will resend).
pub fn hash_after(messages: &[Message], reply: &Message) -> u64 {
    *hashes(messages.iter().chain([reply])).last().unwrap_or(&0)
}

struct Session {
    agent: ActorRef<AgentActor>,
    /// The hash of its transcript after its last reply.
    transcript: Option<u64>,
    /// Requests on it now.
    busy: usize,
    /// When it was last used (the registry's clock).
    used: u64,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Session>,
    by_transcript: HashMap<u64, String>,
    clock: u64,
    next: u64,
}

/// A session checked out for one request.
#[derive(Debug, Clone)]
pub struct Checkout {
    /// Its id (sent back in `X-Session-Id`).
    pub id: String,
    /// Its agent.
    pub agent: ActorRef<AgentActor>,
    /// Whether the request continued a live session found by its transcript.
    pub implicit: bool,
}

/// The sessions of one server.
pub struct Sessions {
    engine: Engine,
    template: AgentConfig,
    max_sessions: usize,
    inner: Mutex<Inner>,
}

impl Sessions {
    /// Sessions whose agents run on `engine` with `template`'s settings (name and
    /// system prompt come from each session).
    pub fn new(engine: Engine, template: AgentConfig, max_sessions: usize) -> Self {
        Self {
            engine,
            template,
            max_sessions: max_sessions.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session for a request: the one named `named` (made if new), or the idle
    /// one whose transcript `messages` extend (longest first), or a new one.
    pub fn checkout(&self, named: Option<&str>, messages: &[Message]) -> Result<Checkout> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some(id) = named {
            if let Some(s) = inner.by_id.get_mut(id) {
                s.busy += 1;
                s.used = now;
                return Ok(Checkout {
                    id: id.to_string(),
                    agent: s.agent.clone(),
                    implicit: false,
                });
            }
            return self.create(&mut inner, id.to_string(), now);
        }
        // Only a proper prefix: the last message is the new one.
        let hashes = prefix_hashes(messages);
        for h in hashes.iter().rev().skip(1) {
            let Some(id) = inner.by_transcript.get(h).cloned() else {
                continue;
            };
            if let Some(s) = inner.by_id.get_mut(&id) {
                if s.busy == 0 {
                    s.busy = 1;
                    s.used = now;
                    return Ok(Checkout {
                        id,
                        agent: s.agent.clone(),
                        implicit: true,
                    });
                }
            }
        }
        inner.next += 1;
        let id = format!("sess-{}", inner.next);
        self.create(&mut inner, id, now)
    }

    fn create(&self, inner: &mut Inner, id: String, now: u64) -> Result<Checkout> {
        while inner.by_id.len() >= self.max_sessions {
            let oldest = inner
                .by_id
                .iter()
                .filter(|(_, s)| s.busy == 0)
                .min_by_key(|(_, s)| s.used)
                .map(|(id, _)| id.clone());
            let Some(old) = oldest else { break };
            Self::end(inner, &old);
        }
        let mut config = self.template.clone();
        config.name = id.clone();
        let agent = self.engine.agent(config, Vec::new())?;
        inner.by_id.insert(
            id.clone(),
            Session {
                agent: agent.clone(),
                transcript: None,
                busy: 1,
                used: now,
            },
        );
        Ok(Checkout {
            id,
            agent,
            implicit: false,
        })
    }

    /// Registers an agent made elsewhere (a fork) under a new id.
    pub fn adopt(&self, agent: ActorRef<AgentActor>) -> String {
        let mut inner = self.lock();
        inner.clock += 1;
        inner.next += 1;
        let id = format!("sess-{}", inner.next);
        let used = inner.clock;
        inner.by_id.insert(
            id.clone(),
            Session {
                agent,
                transcript: None,
                busy: 0,
                used,
            },
        );
        id
    }

    /// Ends a request on `id`; `transcript` is the hash of its transcript after the
    /// reply (`None` when the request failed and the agent kept its old one).
    pub fn checkin(&self, id: &str, transcript: Option<u64>) {
        let mut inner = self.lock();
        let Some(s) = inner.by_id.get_mut(id) else {
            return;
        };
        s.busy = s.busy.saturating_sub(1);
        let Some(new) = transcript else { return };
        let old = s.transcript.replace(new);
        if let Some(old) = old {
            if inner.by_transcript.get(&old).is_some_and(|o| o == id) {
                inner.by_transcript.remove(&old);
            }
        }
        inner.by_transcript.insert(new, id.to_string());
    }

    /// The agent of session `id`.
    pub fn get(&self, id: &str) -> Option<ActorRef<AgentActor>> {
        self.lock().by_id.get(id).map(|s| s.agent.clone())
    }

    /// Ends session `id` (its agent stops, freeing its cache); whether it existed.
    pub fn remove(&self, id: &str) -> bool {
        Self::end(&mut self.lock(), id)
    }

    fn end(inner: &mut Inner, id: &str) -> bool {
        let Some(s) = inner.by_id.remove(id) else {
            return false;
        };
        if let Some(h) = s.transcript {
            if inner.by_transcript.get(&h).is_some_and(|o| o == id) {
                inner.by_transcript.remove(&h);
            }
        }
        s.agent.kill();
        true
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every session's agent.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let ids: Vec<String> = inner.by_id.keys().cloned().collect();
        for id in ids {
            Self::end(&mut inner, &id);
        }
    }
}
