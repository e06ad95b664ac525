//! `troupe serve`: the engine behind the OpenAI API (axum; server-sent events for
//! streams). Each conversation is a session served by an [`AgentActor`], which keeps
//! its token log and KV cache between requests, so a client that resends the whole
//! history each turn computes only the new tokens (see [`sessions`]).
//!
//! Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`,
//! `GET /metrics` (Prometheus text), `GET|DELETE /v1/sessions/{id}`,
//! `POST /v1/sessions/{id}/fork`. Every error is OpenAI's error body with its status
//! ([`errors`]); a client that disconnects cancels its generation at the engine's
//! next step.
//!
//! [`AgentActor`]: crate::agent::AgentActor

pub mod api;
pub mod convert;
pub mod errors;
mod metrics;
mod routes;
pub mod sessions;
mod stream;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::agent::AgentConfig;
use crate::engine::Engine;
use crate::Result;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The model's id in the API (`GET /v1/models`; a request naming another model
    /// gets a 404).
    pub model_id: String,
    /// Requests must send `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Most live sessions; past it the least recently used idle one ends.
    pub max_sessions: usize,
    /// Most requests in flight; past it a request gets a 503.
    pub max_in_flight: usize,
    /// Token limit of a reply whose request names none.
    pub default_max_tokens: usize,
    /// Settings of the sessions' agents (name and messages come from each session).
    pub agent: AgentConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_id: "troupe".into(),
            api_key: None,
            max_sessions: 1024,
            max_in_flight: 256,
            default_max_tokens: 1024,
            agent: AgentConfig::default(),
        }
    }
}

/// Counters of the server itself (the engine keeps its own).
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    recomputed_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// What every handler shares.
struct State {
    engine: Engine,
    config: ServeConfig,
    sessions: sessions::Sessions,
    in_flight: Arc<tokio::sync::Semaphore>,
    counters: Counters,
    started: std::time::Instant,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Serves `engine` on `listener` (bound already: port 0 picks a free one).
    pub fn start(
        engine: Engine,
        config: ServeConfig,
        listener: tokio::net::TcpListener,
    ) -> Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            sessions: sessions::Sessions::new(
                engine.clone(),
                config.agent.clone(),
                config.max_sessions,
            ),
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1))),
            engine,
            config,
            counters: Counters::default(),
            started: std::time::Instant::now(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = routes::router(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        });
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.state.sessions.len()
    }

    /// Waits until the server stops (it stops on [`Self::stop`] or an I/O error).
    pub async fn wait(&mut self) -> Result<()> {
        (&mut self.task)
            .await
            .map_err(|e| crate::Error::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// Stops taking connections, lets requests in flight finish, ends the sessions.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let r = self.wait().await;
        self.state.sessions.clear();
        r
    }
}
