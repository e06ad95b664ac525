//! The [`Engine`] handle: the model, its model actor and the grammar compiler of its
//! tokenizer, in one value that is cheap to clone. Everything above the engine
//! (agents, workflows, the load test, the CLI) starts from it.

use std::path::Path;
use std::sync::Arc;

use kameo::actor::{ActorRef, Spawn};

use super::{EngineConfig, Generate, GenerationStream, GetStats, ModelActor, Rejected, Stats};
use crate::grammar::GrammarCompiler;
use crate::kv::{KvCache, KvDtype};
use crate::model::{LoadOptions, Model};
use crate::{Error, Result};

/// A loaded model served by its model actor (see the module docs).
#[derive(Clone)]
pub struct Engine {
    model: Arc<Model>,
    actor: ActorRef<ModelActor>,
    grammars: Arc<GrammarCompiler>,
    kv_dtype: KvDtype,
    /// Whether the engine spills evicted caches to disk.
    spills: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.info().path)
            .field("kv_dtype", &self.kv_dtype)
            .finish()
    }
}

impl Engine {
    /// Loads the GGUF model at `path` and starts its model actor (call it inside a
    /// tokio runtime).
    pub fn start(path: &Path, load: LoadOptions, config: EngineConfig) -> Result<Self> {
        let model = Arc::new(Model::load(path, load)?);
        Self::serve(model, config)
    }

    /// Starts a model actor for a model already loaded.
    pub fn serve(model: Arc<Model>, config: EngineConfig) -> Result<Self> {
        let grammars = Arc::new(GrammarCompiler::new(model.tokenizer())?);
        let kv_dtype = config.kv_dtype;
        let spills = config.spill.is_some();
        let actor = ModelActor::spawn(ModelActor::new(model.clone(), grammars.clone(), config)?);
        Ok(Self {
            model,
            actor,
            grammars,
            kv_dtype,
            spills,
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The model actor.
    pub fn actor(&self) -> &ActorRef<ModelActor> {
        &self.actor
    }

    /// The grammar compiler of the model's tokenizer (compiled grammars are cached,
    /// so a thousand agents sharing one grammar compile it once).
    pub fn grammars(&self) -> &Arc<GrammarCompiler> {
        &self.grammars
    }

    /// The KV element type of caches that name none.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Whether the engine spills evicted caches to disk instead of dropping them
    /// ([`EngineConfig::spill`]): a holder asked to [`Evict`](super::Evict) then
    /// hands its cache over with [`Spill`](super::Spill).
    pub fn spills(&self) -> bool {
        self.spills
    }

    /// An empty cache of the engine's KV element type.
    pub fn new_cache(&self) -> KvCache {
        self.model.new_cache(self.kv_dtype)
    }

    /// Sends a generation request.
    // The error is the actor's own reply: the cache comes back by value.
    #[allow(clippy::result_large_err)]
    pub async fn generate(&self, g: Generate) -> std::result::Result<GenerationStream, Rejected> {
        use kameo::error::SendError;
        match self.actor.ask(g).await {
            Ok(s) => Ok(s),
            Err(SendError::HandlerError(r)) => Err(r),
            Err(
                SendError::ActorNotRunning(g)
                | SendError::ActorRestarting(g)
                | SendError::MailboxFull(g)
                | SendError::Timeout(Some(g)),
            ) => Err(Rejected::of(Error::EngineStopped, g)),
            Err(SendError::Timeout(None) | SendError::ActorStopped) => Err(Rejected {
                error: Error::EngineStopped,
                cache: self.new_cache().into(),
                resume: None,
            }),
        }
    }

    /// The engine's counters.
    pub async fn stats(&self) -> Result<Stats> {
        match self.actor.ask(GetStats).await {
            Ok(s) => Ok(s),
            Err(kameo::error::SendError::HandlerError(e)) => Err(e),
            Err(_) => Err(Error::EngineStopped),
        }
    }

    /// Stops the model actor: its in-flight requests fail with their caches, and
    /// the engine thread is joined before this returns.
    pub async fn stop(&self) {
        let _ = self.actor.stop_gracefully().await;
        // After `on_stop` (which joins the thread), not just the mailbox closing.
        let _ = self.actor.wait_for_shutdown_result().await;
    }
}
