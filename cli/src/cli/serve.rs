//! `troupe serve`: the OpenAI-compatible server (see `troupe::serve`), until Ctrl-C.

use std::path::Path;

use anyhow::Context;
use troupe::engine::{Engine, EngineConfig, SchedulerConfig};
use troupe::model::{LoadOptions, WeightsMode};
use troupe::serve::{ServeConfig, Server};

/// The command's arguments.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Budget of all sessions' KV caches together, in bytes (idle sessions are
    /// evicted past it; their messages stay).
    #[arg(long, default_value_t = 4 << 30)]
    pub kv_budget: usize,
    /// Requests must send `Authorization: Bearer KEY` (also from TROUPE_API_KEY).
    #[arg(long, env = "TROUPE_API_KEY")]
    pub api_key: Option<String>,
    /// The model's id in the API (default: the model file's name without `.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Most live sessions (the least recently used idle one ends past it).
    #[arg(long, default_value_t = 1024)]
    pub max_sessions: usize,
    /// Most requests in flight (a 503 past it).
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Token limit of a reply whose request names none.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
}

/// Serves until Ctrl-C (or SIGTERM).
pub fn run(path: &Path, weights: WeightsMode, a: &ServeArgs) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    rt.block_on(async {
        // The global flags' settings (--kv-dtype, --spill), with this command's budget.
        let config = EngineConfig {
            scheduler: SchedulerConfig {
                kv_budget_bytes: a.kv_budget,
                max_running: a.max_running,
                ..SchedulerConfig::default()
            },
            ..super::engine_config()
        };
        let engine = Engine::start(path, LoadOptions { weights }, config)
            .with_context(|| format!("loading {}", path.display()))?;
        let model_id = a.model_id.clone().unwrap_or_else(|| {
            path.file_stem()
                .map_or("troupe".into(), |s| s.to_string_lossy().into_owned())
        });
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let serve = ServeConfig {
            model_id: model_id.clone(),
            api_key: a.api_key.clone(),
            max_sessions: a.max_sessions,
            max_in_flight: a.max_in_flight,
            default_max_tokens: a.max_tokens,
            ..ServeConfig::default()
        };
        let server = Server::start(engine.clone(), serve, listener)?;
        // The first line of stdout is the address (tests and scripts read it).
        println!("listening on http://{} (model {model_id})", server.addr());
        shutdown_signal().await;
        eprintln!("stopping");
        server.stop().await?;
        engine.stop().await;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
