//! The kameo actor in front of the engine thread: it checks each request against the
//! model and the budget (so a bad request fails at once, with its cache handed
//! back), then passes it on. Its handlers never run the forward.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use kameo::error::SendError;
use kameo::message::{Context, Message};
use kameo::reply::DelegatedReply;
use kameo::Actor;

use super::worker::{self, Command, Submission};
use super::{EngineConfig, EvictFn, Generate, GenerationStream, Rejected, Stats};
use crate::grammar::GrammarCompiler;
use crate::kv::KvCache;
use crate::model::Model;
use crate::sampling::Sampler;
use crate::{Error, Result};

/// One per loaded model, shared by any number of requesters.
pub struct ModelActor {
    model: Arc<Model>,
    grammars: Arc<GrammarCompiler>,
    config: EngineConfig,
    engine: Sender<Command>,
    /// The engine thread, to notice that it died.
    thread: std::thread::JoinHandle<()>,
    /// Times the engine thread was restarted.
    restarts: u64,
    next_id: u64,
}

impl std::fmt::Debug for ModelActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelActor")
            .field("config", &self.config)
            .finish()
    }
}

impl ModelActor {
    /// Starts the engine thread for `model`; spawn the returned value with
    /// `kameo::actor::Spawn::spawn`.
    pub fn new(model: Arc<Model>, config: EngineConfig) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = worker::spawn(model.clone(), config.clone(), rx)?;
        Ok(Self {
            grammars: model.grammar_compiler()?,
            model,
            config,
            engine: tx,
            thread,
            restarts: 0,
            next_id: 0,
        })
    }

    /// Starts a new engine thread in place of a dead one. The requests that were in
    /// the dead one saw their streams end ([`Error::EngineStopped`]); the idle caches
    /// it accounted are no longer counted (their holders re-register on their next
    /// request).
    fn restart(&mut self) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.thread = worker::spawn(self.model.clone(), self.config.clone(), rx)?;
        self.engine = tx;
        self.restarts += 1;
        tracing::error!(
            restarts = self.restarts,
            "the engine thread died; started a new one"
        );
        Ok(())
    }

    /// Sends a command to the engine thread, restarting the thread first when it
    /// died; gives the command back when even a new thread cannot take it.
    fn send(&mut self, c: Command) -> std::result::Result<(), Command> {
        if self.thread.is_finished() && self.restart().is_err() {
            return Err(c);
        }
        match self.engine.send(c) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::SendError(c)) => {
                if self.restart().is_err() {
                    return Err(c);
                }
                self.engine
                    .send(c)
                    .map_err(|std::sync::mpsc::SendError(c)| c)
            }
        }
    }

    /// The model this actor serves.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Checks a request; on success returns the tokens its cache must have room for
    /// and their bytes.
    fn check(&self, g: &Generate) -> Result<(usize, usize)> {
        let cfg = self.model.config();
        g.cache.check_layout(cfg.kv_layout())?;
        if g.tokens.is_empty() {
            return Err(Error::InvalidInput(if g.cache.is_empty() {
                "empty prompt: a generation needs at least one token".into()
            } else {
                "no new tokens: a generation needs at least one token past the cache".into()
            }));
        }
        if let Some(&id) = g.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab_size: cfg.vocab_size,
            });
        }
        if g.max_tokens == 0 {
            return Err(Error::InvalidInput("max_tokens must be at least 1".into()));
        }
        g.sampling.validate()?;
        // Checked: a `max_tokens` near `usize::MAX` must not wrap past the checks.
        let tokens = match g
            .cache
            .len()
            .checked_add(g.tokens.len())
            .and_then(|t| t.checked_add(g.max_tokens))
        {
            Some(t) if t <= cfg.context_length => t,
            _ => {
                return Err(Error::RequestTooLong {
                    cached: g.cache.len(),
                    new: g.tokens.len(),
                    max_tokens: g.max_tokens,
                    context: cfg.context_length,
                })
            }
        };
        let per_token = KvCache::bytes_per_token(cfg.kv_layout(), g.cache.dtype());
        let bytes = g.cache.bytes().max(per_token.saturating_mul(tokens));
        let budget = self.config.scheduler.kv_budget_bytes;
        if bytes > budget {
            return Err(Error::KvBudgetExceeded {
                needed: bytes,
                tokens,
                budget,
            });
        }
        Ok((tokens, bytes))
    }
}

impl Actor for ModelActor {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(
        args: Self::Args,
        _: kameo::actor::ActorRef<Self>,
    ) -> std::result::Result<Self, Self::Error> {
        Ok(args)
    }
}

impl Message<Generate> for ModelActor {
    type Reply = DelegatedReply<std::result::Result<GenerationStream, Rejected>>;

    async fn handle(
        &mut self,
        mut g: Generate,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        if g.engine_kv_dtype && g.cache.is_empty() && g.cache.dtype() != self.config.kv_dtype {
            // Nothing stored yet: the cache can take the engine's element type.
            g.cache = self.model.new_cache(self.config.kv_dtype);
        }
        let Some(spec) = g.grammar.take() else {
            let reply = self.accept(g);
            return ctx.reply(reply);
        };
        if self.grammars.is_cached(&spec) {
            let reply = match self.grammars.compile(&spec) {
                Ok(c) => {
                    g.constraint = Some(Box::new(c.constraint()));
                    self.accept(g)
                }
                Err(error) => Err(Rejected {
                    error,
                    cache: g.cache,
                }),
            };
            return ctx.reply(reply);
        }
        // A cache miss runs llguidance's compiler, which can take a while: on the
        // blocking pool, and without holding up this actor's other requests. The
        // compiled request comes back to this actor as a plain one.
        let (delegated, reply) = ctx.reply_sender();
        let (me, grammars, model) = (
            ctx.actor_ref().clone(),
            self.grammars.clone(),
            self.model.clone(),
        );
        tokio::spawn(async move {
            let compiled = tokio::task::spawn_blocking(move || grammars.compile(&spec))
                .await
                .unwrap_or_else(|e| {
                    Err(Error::Grammar {
                        kind: "grammar",
                        message: format!("compilation stopped: {e}"),
                    })
                });
            let result = match compiled {
                Ok(c) => {
                    g.constraint = Some(Box::new(c.constraint()));
                    match me.ask(g).await {
                        Ok(stream) => Ok(stream),
                        Err(SendError::HandlerError(r)) => Err(r),
                        Err(
                            SendError::ActorNotRunning(g)
                            | SendError::ActorRestarting(g)
                            | SendError::MailboxFull(g),
                        ) => Err(Rejected {
                            error: Error::EngineStopped,
                            cache: g.cache,
                        }),
                        Err(_) => Err(Rejected {
                            error: Error::EngineStopped,
                            cache: model.new_cache(crate::kv::KvDtype::default()),
                        }),
                    }
                }
                Err(error) => Err(Rejected {
                    error,
                    cache: g.cache,
                }),
            };
            if let Some(reply) = reply {
                reply.send(result);
            }
        });
        delegated
    }
}

impl ModelActor {
    /// Checks a request whose grammar (if any) is compiled, and hands it to the
    /// engine thread.
    // The error is the message's own reply type: the cache comes back by value.
    #[allow(clippy::result_large_err)]
    fn accept(&mut self, g: Generate) -> std::result::Result<GenerationStream, Rejected> {
        let (needed_tokens, needed_bytes) = match self.check(&g) {
            Ok(n) => n,
            Err(error) => {
                return Err(Rejected {
                    error,
                    cache: g.cache,
                })
            }
        };
        let sampler = match Sampler::new(g.sampling.clone()) {
            Ok(s) => s,
            Err(error) => {
                return Err(Rejected {
                    error,
                    cache: g.cache,
                })
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.next_id += 1;
        let sub = Submission {
            id: self.next_id,
            request: g,
            sampler,
            tx,
            submitted: Instant::now(),
            needed_tokens,
            needed_bytes,
        };
        match self.send(Command::Submit(Box::new(sub))) {
            Ok(()) => Ok(GenerationStream { rx }),
            Err(Command::Submit(sub)) => Err(Rejected {
                error: Error::EngineStopped,
                cache: sub.request.cache,
            }),
            // `send` gives back the command it was given.
            Err(_) => Err(Rejected {
                error: Error::EngineStopped,
                cache: self.model.new_cache(self.config.kv_dtype),
            }),
        }
    }
}

/// Asks for the engine's [`Stats`].
#[derive(Debug, Clone, Copy)]
pub struct GetStats;

impl Message<GetStats> for ModelActor {
    type Reply = std::result::Result<Stats, Error>;

    async fn handle(&mut self, _: GetStats, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Stats(tx))
            .map_err(|_| Error::EngineStopped)?;
        let mut stats = rx.await.map_err(|_| Error::EngineStopped)?;
        stats.engine_restarts += self.restarts;
        Ok(stats)
    }
}

/// Registers an idle cache held outside the engine (an agent between turns): it
/// counts against the KV budget, and when admitting work would exceed the budget the
/// engine calls `evict` on the least recently active holders (tool-call holders
/// last). Registering again refreshes the holder's recency.
pub struct HoldCache {
    /// Who holds it.
    pub holder: u64,
    /// Bytes it holds.
    pub bytes: usize,
    /// The holder is in the middle of a tool call (asked last).
    pub in_tool_call: bool,
    /// Asks the holder to drop its cache; the holder then sends [`ReleaseCache`].
    pub evict: EvictFn,
}

impl std::fmt::Debug for HoldCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldCache")
            .field("holder", &self.holder)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Message<HoldCache> for ModelActor {
    type Reply = ();

    async fn handle(&mut self, h: HoldCache, _: &mut Context<Self, Self::Reply>) {
        let _ = self.send(Command::Hold {
            holder: h.holder,
            bytes: h.bytes,
            last: h.in_tool_call,
            evict: h.evict,
        });
    }
}

/// The holder took its idle cache back (into a request) or dropped it.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseCache {
    /// Who held it.
    pub holder: u64,
}

impl Message<ReleaseCache> for ModelActor {
    type Reply = ();

    async fn handle(&mut self, r: ReleaseCache, _: &mut Context<Self, Self::Reply>) {
        let _ = self.send(Command::Release { holder: r.holder });
    }
}
