//! The kameo actor in front of the engine thread: it checks each request against the
//! model and the budget (so a bad request fails at once, with its cache handed
//! back), then passes it on. Its handlers never run the forward, and never wait for
//! the engine: a reply that needs the engine is delegated.
//!
//! It owns the engine thread's lifecycle: a dead thread is replaced on the next
//! request, and stopping the actor shuts the thread down (its in-flight requests
//! fail with their caches) and joins it.

use std::sync::Arc;
use std::time::Instant;

use kameo::actor::{ActorRef, WeakActorRef, WeakRecipient};
use kameo::error::{ActorStopReason, SendError};
use kameo::message::{Context, Message};
use kameo::reply::DelegatedReply;
use kameo::Actor;

use super::lease::{Evict, Lease, LeaseId, LeasedCache, ParkedCache};
use super::worker::{self, Command, Submission};
use super::{EngineConfig, Generate, GenerationStream, Rejected, Stats};
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
    /// The engine thread; `None` once shut down.
    thread: Option<worker::Thread>,
    /// Where evictions are delivered from (this actor's runtime).
    runtime: Option<tokio::runtime::Handle>,
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
    /// Starts the engine thread for `model`, with the grammar compiler requests'
    /// grammars are compiled by; spawn the returned value with
    /// `kameo::actor::Spawn::spawn` (or start everything with
    /// [`Engine`](super::Engine)).
    pub fn new(
        model: Arc<Model>,
        grammars: Arc<GrammarCompiler>,
        config: EngineConfig,
    ) -> Result<Self> {
        let thread = worker::spawn(model.clone(), config.clone())?;
        Ok(Self {
            grammars,
            model,
            config,
            thread: Some(thread),
            runtime: None,
            restarts: 0,
            next_id: 0,
        })
    }

    /// Starts a new engine thread in place of a dead one. The requests that were in
    /// the dead one saw their streams end ([`Error::EngineStopped`]); the leases it
    /// handed out are no longer counted (their holders' caches are accounted again
    /// with their next request).
    fn restart(&mut self) -> Result<()> {
        let thread = worker::spawn(self.model.clone(), self.config.clone())?;
        if let Some(rt) = &self.runtime {
            let _ = thread.tx.send(Command::Runtime(rt.clone()));
        }
        self.thread = Some(thread);
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
        let dead = self.thread.as_ref().is_none_or(|t| t.handle.is_finished());
        if dead && self.restart().is_err() {
            return Err(c);
        }
        let Some(t) = &self.thread else {
            return Err(c);
        };
        match t.tx.send(c) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::SendError(c)) => {
                if self.restart().is_err() {
                    return Err(c);
                }
                let Some(t) = &self.thread else {
                    return Err(c);
                };
                t.tx.send(c).map_err(|std::sync::mpsc::SendError(c)| c)
            }
        }
    }

    /// A sender on the engine's channel (for the leases this actor hands out).
    fn engine_tx(&mut self) -> Option<std::sync::mpsc::Sender<Command>> {
        let dead = self.thread.as_ref().is_none_or(|t| t.handle.is_finished());
        if dead {
            self.restart().ok()?;
        }
        self.thread.as_ref().map(|t| t.tx.clone())
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
        if let Some(r) = &g.resume {
            if !g.cache.is_empty() || r.prefix.len() != r.parked.len() {
                return Err(Error::BadRequest {
                    what: format!(
                        "a request resuming a park of {} tokens brings a cache of {} and a prefix of {}",
                        r.parked.len(),
                        g.cache.len(),
                        r.prefix.len()
                    ),
                });
            }
        }
        let cached = g.cached_len();
        if g.tokens.is_empty() {
            return Err(Error::BadRequest {
                what: if cached == 0 {
                    "empty prompt: a generation needs at least one token".into()
                } else {
                    "no new tokens: a generation needs at least one token past the cache".into()
                },
            });
        }
        if let Some(&id) = g.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab_size: cfg.vocab_size,
            });
        }
        if g.max_tokens == 0 {
            return Err(Error::BadRequest {
                what: "max_tokens must be at least 1".into(),
            });
        }
        g.sampling.validate()?;
        // Checked: a `max_tokens` near `usize::MAX` must not wrap past the checks.
        let tokens = match cached
            .checked_add(g.tokens.len())
            .and_then(|t| t.checked_add(g.max_tokens))
        {
            Some(t) if t <= cfg.context_length => t,
            _ => {
                return Err(Error::RequestTooLong {
                    cached,
                    new: g.tokens.len(),
                    max_tokens: g.max_tokens,
                    context: cfg.context_length,
                })
            }
        };
        let dtype = g
            .resume
            .as_ref()
            .map_or(g.cache.dtype(), |r| r.parked.dtype);
        let per_token = KvCache::bytes_per_token(cfg.kv_layout(), dtype);
        let bytes = g.cache.bytes().max(per_token.saturating_mul(tokens));
        if !self.config.scheduler.admits(bytes) {
            return Err(Error::KvBudgetExceeded {
                needed: bytes,
                tokens,
                budget: self.config.scheduler.kv_budget_bytes,
            });
        }
        Ok((tokens, bytes))
    }
}

impl Actor for ModelActor {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(
        mut args: Self::Args,
        _: ActorRef<Self>,
    ) -> std::result::Result<Self, Self::Error> {
        let rt = tokio::runtime::Handle::current();
        args.runtime = Some(rt.clone());
        let _ = args.send(Command::Runtime(rt));
        Ok(args)
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> std::result::Result<(), Self::Error> {
        // In-flight requests fail with their caches; then the thread ends.
        if let Some(t) = self.thread.take() {
            let _ = t.tx.send(Command::Shutdown);
            let _ = tokio::task::spawn_blocking(move || t.handle.join()).await;
        }
        Ok(())
    }
}

impl Drop for ModelActor {
    fn drop(&mut self) {
        // An actor that never ran (or whose stop did not run) still ends its thread.
        if let Some(t) = self.thread.take() {
            let _ = t.tx.send(Command::Shutdown);
        }
    }
}

impl Message<Generate> for ModelActor {
    type Reply = DelegatedReply<std::result::Result<GenerationStream, Rejected>>;

    async fn handle(
        &mut self,
        mut g: Generate,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        if g.engine_kv_dtype
            && g.cache.is_empty()
            && g.resume.is_none()
            && g.cache.dtype() != self.config.kv_dtype
        {
            // Nothing stored yet: the cache can take the engine's element type.
            g.cache = self.model.new_cache(self.config.kv_dtype).into();
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
                Err(error) => Err(Rejected::of(error, g)),
            };
            return ctx.reply(reply);
        }
        // A cache miss runs llguidance's compiler, which can take a while: on the
        // blocking pool, and without holding up this actor's other requests. The
        // compiled request comes back to this actor as a plain one.
        let (delegated, reply) = ctx.reply_sender();
        let (me, grammars) = (ctx.actor_ref().clone(), self.grammars.clone());
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
                        ) => Err(Rejected::of(Error::EngineStopped, g)),
                        Err(SendError::Timeout(Some(g))) => {
                            Err(Rejected::of(Error::EngineStopped, g))
                        }
                        // The request is gone with its cache: nothing to hand back.
                        Err(SendError::Timeout(None) | SendError::ActorStopped) => return,
                    }
                }
                Err(error) => Err(Rejected::of(error, g)),
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
            Err(error) => return Err(Rejected::of(error, g)),
        };
        let sampler = match Sampler::new(g.sampling.clone()) {
            Ok(s) => s,
            Err(error) => return Err(Rejected::of(error, g)),
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
            Ok(()) => Ok(GenerationStream {
                rx,
                wake: self.thread.as_ref().map(|t| t.tx.clone()),
            }),
            Err(Command::Submit(sub)) => Err(Rejected::of(Error::EngineStopped, sub.request)),
            // `send` gives back the command it was given.
            Err(_) => Err(Rejected {
                error: Error::EngineStopped,
                cache: self.model.new_cache(self.config.kv_dtype).into(),
                resume: None,
            }),
        }
    }
}

/// Asks for the engine's [`Stats`]. Answered by the engine thread (between steps),
/// without holding up this actor's other messages.
#[derive(Debug, Clone, Copy)]
pub struct GetStats;

impl Message<GetStats> for ModelActor {
    type Reply = DelegatedReply<std::result::Result<Stats, Error>>;

    async fn handle(&mut self, _: GetStats, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.send(Command::Stats(tx)).is_err() {
            return ctx.reply(Err(Error::EngineStopped));
        }
        let restarts = self.restarts;
        let (delegated, reply) = ctx.reply_sender();
        tokio::spawn(async move {
            let stats = rx.await.map_err(|_| Error::EngineStopped).map(|mut s| {
                s.engine_restarts += restarts;
                s
            });
            if let Some(reply) = reply {
                reply.send(stats);
            }
        });
        delegated
    }
}

/// Accounts a cache held outside the engine (an agent that starts with one: forked
/// or loaded) against the KV budget: replies with it leased to `holder`, who gets an
/// [`Evict`] naming the lease when the engine needs the room.
pub struct Hold {
    /// The cache.
    pub cache: LeasedCache,
    /// Who holds it.
    pub holder: WeakRecipient<Evict>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("bytes", &self.cache.bytes())
            .finish()
    }
}

impl Message<Hold> for ModelActor {
    type Reply = LeasedCache;

    async fn handle(&mut self, h: Hold, _: &mut Context<Self, Self::Reply>) -> LeasedCache {
        let (cache, old) = h.cache.into_parts();
        drop(old);
        let Some(tx) = self.engine_tx() else {
            return cache.into();
        };
        if cache.bytes() == 0 {
            return cache.into();
        }
        let lease = LeaseId::fresh();
        let _ = tx.send(Command::Hold {
            lease,
            bytes: cache.bytes(),
            holder: h.holder,
        });
        LeasedCache::leased(cache, Lease::new(lease, tx))
    }
}

/// Parks a cache with the engine while its holder waits on something slow (a tool
/// call): the engine holds the bytes, still accounted, and may drop them at once
/// under KV pressure instead of waiting for the holder. Name the returned
/// [`ParkedCache`] in the next request ([`Generate::resume`]).
#[derive(Debug)]
pub struct Park(pub LeasedCache);

impl Message<Park> for ModelActor {
    type Reply = std::result::Result<ParkedCache, LeasedCache>;

    async fn handle(
        &mut self,
        Park(cache): Park,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.park(cache, false)
    }
}

/// Parks a cache whose holder was asked to [`Evict`] it, and has the engine write it
/// to its spill folder at once (see [`EngineConfig::spill`]): its bytes leave the
/// budget when the write ends, and the next request naming the returned
/// [`ParkedCache`] ([`Generate::resume`]) reads it back instead of recomputing it.
/// An engine that does not spill hands the cache back.
#[derive(Debug)]
pub struct Spill(pub LeasedCache);

impl Message<Spill> for ModelActor {
    type Reply = std::result::Result<ParkedCache, LeasedCache>;

    async fn handle(
        &mut self,
        Spill(cache): Spill,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        if self.config.spill.is_none() {
            return Err(cache);
        }
        self.park(cache, true)
    }
}

impl ModelActor {
    // The error is the message's own reply type: the cache comes back by value.
    #[allow(clippy::result_large_err)]
    fn park(
        &mut self,
        cache: LeasedCache,
        spill: bool,
    ) -> std::result::Result<ParkedCache, LeasedCache> {
        let Some(tx) = self.engine_tx() else {
            return Err(cache);
        };
        let (cache, old) = cache.into_parts();
        let (len, dtype) = (cache.len(), cache.dtype());
        let lease = LeaseId::fresh();
        let replaces = old.map(Lease::disarm);
        if let Err(std::sync::mpsc::SendError(Command::Park { cache, .. })) =
            tx.send(Command::Park {
                lease,
                cache,
                replaces,
                spill,
            })
        {
            return Err(cache.into());
        }
        Ok(ParkedCache {
            lease: Lease::new(lease, tx),
            len,
            dtype,
        })
    }
}
