//! One connection to an MCP server (rmcp's client): starting it (a child process on
//! stdio, or streamable HTTP), checking its protocol version, listing its tools,
//! calling one, and restarting the server once if it dies mid-session.
//!
//! Start-up is bounded by the server's startup timeout, so a server that writes
//! something other than MCP to stdout, or never answers `initialize`, is an error
//! naming it rather than a hang. A tool call is cancelled by dropping its future
//! (the agent's tool timeout aborts the call's task): rmcp then sends the server
//! `notifications/cancelled` for the request.

use std::future::Future;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::ProtocolVersion;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, Peer, ServiceError, ServiceExt};
use tokio::io::AsyncBufReadExt;

use super::McpServerConfig;
use crate::{Error, Result};

/// The protocol versions troupe's client speaks (those with an `initialize`
/// handshake); a server answering with another one is refused at start.
const KNOWN_VERSIONS: [ProtocolVersion; 4] = [
    ProtocolVersion::V_2024_11_05,
    ProtocolVersion::V_2025_03_26,
    ProtocolVersion::V_2025_06_18,
    ProtocolVersion::V_2025_11_25,
];

/// Most bytes of a server's stderr kept for start-up errors.
const STDERR_TAIL: usize = 2048;

/// A tool as the server lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteTool {
    /// The server's name for it.
    pub remote: String,
    /// Its description.
    pub description: String,
    /// Its `inputSchema`.
    pub schema: serde_json::Value,
}

/// The client side of the connection: counts `notifications/tools/list_changed`.
#[derive(Clone)]
struct Notifier {
    info: ClientConfig,
    changed: Arc<AtomicU64>,
}

impl ClientHandler for Notifier {
    fn on_tool_list_changed(
        &self,
        _: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.changed.fetch_add(1, Ordering::SeqCst);
        std::future::ready(())
    }

    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
}

type Service = RunningService<RoleClient, Notifier>;

/// What changes over the connection's life.
struct State {
    /// The running client (`None` after a failed restart).
    service: Option<Service>,
    /// The server died during a call (its transport may not say so yet).
    dead: bool,
    /// Whether the one restart has been used.
    restarted: bool,
    /// The tools as last listed, and the change count they were listed at.
    tools: Vec<RemoteTool>,
    listed_at: u64,
}

/// A connection to one MCP server, shared by an agent and its forks. Dropping the
/// last handle ends the session (a stdio server's process is killed).
pub struct ServerLink {
    config: McpServerConfig,
    state: tokio::sync::Mutex<State>,
    /// `list_changed` notifications and restarts so far.
    changed: Arc<AtomicU64>,
}

impl ServerLink {
    /// Starts the server, checks its protocol version and lists its tools, within
    /// its startup timeout.
    pub async fn connect(config: McpServerConfig) -> Result<Self> {
        let changed = Arc::new(AtomicU64::new(0));
        let (service, tools) = start(&config, changed.clone()).await?;
        Ok(Self {
            config,
            state: tokio::sync::Mutex::new(State {
                service: Some(service),
                dead: false,
                restarted: false,
                tools,
                listed_at: 0,
            }),
            changed,
        })
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its config.
    pub fn config(&self) -> &McpServerConfig {
        &self.config
    }

    /// Tool-list changes announced so far (and restarts).
    pub fn generation(&self) -> u64 {
        self.changed.load(Ordering::SeqCst)
    }

    /// The server's tools, listed again if it announced a change since the last
    /// listing (a failed re-listing keeps the last list).
    pub async fn tools(&self) -> Result<Vec<RemoteTool>> {
        let mut st = self.state.lock().await;
        let now = self.generation();
        if st.listed_at != now {
            if let Some(s) = &st.service {
                match tokio::time::timeout(self.config.startup_timeout(), list(s.peer())).await {
                    Ok(Ok(tools)) => st.tools = tools,
                    Ok(Err(e)) => {
                        tracing::warn!(server = %self.config.name, "re-listing tools: {e}")
                    }
                    Err(_) => {
                        tracing::warn!(server = %self.config.name, "re-listing tools timed out")
                    }
                }
            }
            st.listed_at = now;
        }
        Ok(st.tools.clone())
    }

    /// Calls `tool` with `arguments` (an object); the result's text content (notes
    /// for images and resources) or the error the model should see.
    pub async fn call(
        self: &Arc<Self>,
        tool: &str,
        arguments: serde_json::Value,
    ) -> std::result::Result<String, String> {
        let arguments = match arguments {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => Default::default(),
            other => return Err(format!("arguments must be an object, not {other}")),
        };
        let peer = self.peer().await?;
        let params = CallToolRequestParams::new(tool.to_string()).with_arguments(arguments);
        match peer.call_tool(params).await {
            Ok(result) => super::tool::result_text(&result),
            Err(ServiceError::McpError(e)) => Err(e.message.to_string()),
            Err(e @ (ServiceError::TransportClosed | ServiceError::TransportSend(_))) => {
                let restarted = {
                    let mut st = self.state.lock().await;
                    st.dead = true;
                    st.restarted
                };
                let next = if restarted {
                    "it was restarted once already, so its tools are gone for this session"
                } else {
                    // Restarted now, not at the next call, so that the agent's next
                    // turn sees the restarted server's tools.
                    let link = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = link.peer().await {
                            tracing::warn!(server = %link.config.name, "{e}");
                        }
                    });
                    "troupe restarts it (once)"
                };
                Err(format!(
                    "MCP server `{}` stopped during the call ({e}); {next}",
                    self.config.name
                ))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The running client's peer, restarting the server once if it has died.
    async fn peer(&self) -> std::result::Result<Peer<RoleClient>, String> {
        let mut st = self.state.lock().await;
        if let Some(s) = &st.service {
            if !st.dead && !s.is_closed() && !s.peer().is_transport_closed() {
                return Ok(s.peer().clone());
            }
        }
        if st.restarted {
            return Err(format!(
                "MCP server `{}` has stopped (it was restarted once already)",
                self.config.name
            ));
        }
        st.restarted = true;
        st.service = None;
        tracing::warn!(server = %self.config.name, "MCP server stopped: restarting it");
        match start(&self.config, self.changed.clone()).await {
            Ok((service, tools)) => {
                let peer = service.peer().clone();
                st.service = Some(service);
                st.dead = false;
                st.tools = tools;
                // Agents compare their tools with the new list before their next turn.
                self.changed.fetch_add(1, Ordering::SeqCst);
                st.listed_at = self.generation();
                Ok(peer)
            }
            Err(e) => Err(format!(
                "the server stopped and could not be restarted: {e}"
            )),
        }
    }
}

/// An error naming the server.
fn fail(config: &McpServerConfig, what: impl Into<String>) -> Error {
    Error::Mcp {
        server: config.name.clone(),
        what: what.into(),
    }
}

/// Starts the server and lists its tools, all within the startup timeout.
async fn start(
    config: &McpServerConfig,
    changed: Arc<AtomicU64>,
) -> Result<(Service, Vec<RemoteTool>)> {
    let mut info = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("troupe", env!("CARGO_PKG_VERSION")),
    );
    info.protocol_version = ProtocolVersion::LATEST_WITH_INITIALIZE;
    let handler = Notifier { info, changed };
    let timeout = config.startup_timeout();
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut drain = None;
    let started = tokio::time::timeout(timeout, async {
        let service = match (&config.command, &config.url) {
            (Some(cmd), _) => {
                let mut c = tokio::process::Command::new(cmd);
                c.args(&config.args).envs(&config.env).kill_on_drop(true);
                if let Some(dir) = &config.cwd {
                    c.current_dir(dir);
                }
                let (transport, err) = TokioChildProcess::builder(c)
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| fail(config, format!("cannot start `{cmd}`: {e}")))?;
                if let Some(err) = err {
                    drain = Some(tokio::spawn(keep_tail(
                        err,
                        stderr.clone(),
                        config.name.clone(),
                    )));
                }
                handler.serve(transport).await
            }
            (None, Some(url)) => {
                let mut headers = std::collections::HashMap::new();
                for (k, v) in &config.headers {
                    let name = axum::http::HeaderName::try_from(k.as_str())
                        .map_err(|e| fail(config, format!("header `{k}`: {e}")))?;
                    let value = axum::http::HeaderValue::try_from(v.as_str())
                        .map_err(|e| fail(config, format!("header `{k}` value: {e}")))?;
                    headers.insert(name, value);
                }
                let cfg = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                    .custom_headers(headers);
                handler
                    .serve(StreamableHttpClientTransport::from_config(cfg))
                    .await
            }
            (None, None) => return Err(fail(config, "no command or url")),
        }
        .map_err(|e| fail(config, format!("initialize failed: {e}")))?;
        let version = service
            .peer()
            .peer_info()
            .map(|i| i.protocol_version.clone());
        match version {
            Some(v) if KNOWN_VERSIONS.contains(&v) => {}
            other => {
                return Err(fail(
                    config,
                    format!(
                        "speaks MCP protocol version {}; troupe knows {}",
                        other.map_or("(none)".to_string(), |v| v.to_string()),
                        KNOWN_VERSIONS.map(|v| v.to_string()).join(", ")
                    ),
                ))
            }
        }
        let tools = list(service.peer())
            .await
            .map_err(|e| fail(config, format!("tools/list failed: {e}")))?;
        Ok((service, tools))
    })
    .await;
    let result = match started {
        Ok(r) => r,
        Err(_) => Err(fail(
            config,
            format!(
                "did not start and answer `initialize` and `tools/list` within {:.1} s",
                timeout.as_secs_f64()
            ),
        )),
    };
    if let (Err(_), Some(d)) = (&result, drain) {
        // A server that fails at start usually says why on stderr: let it finish.
        let _ = tokio::time::timeout(Duration::from_millis(300), d).await;
    }
    result.map_err(|e| {
        let tail = stderr
            .lock()
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        match e {
            Error::Mcp { server, what } if !tail.is_empty() => Error::Mcp {
                server,
                what: format!("{what}; its stderr ends: {tail}"),
            },
            e => e,
        }
    })
}

/// Keeps the last [`STDERR_TAIL`] bytes of a server's stderr (and logs each line at
/// debug level).
async fn keep_tail(err: tokio::process::ChildStderr, tail: Arc<Mutex<String>>, server: String) {
    let mut lines = tokio::io::BufReader::new(err).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(server = %server, "stderr: {line}");
        if let Ok(mut t) = tail.lock() {
            t.push_str(&line);
            t.push('\n');
            if t.len() > STDERR_TAIL {
                let mut cut = t.len() - STDERR_TAIL;
                while !t.is_char_boundary(cut) {
                    cut += 1;
                }
                t.drain(..cut);
            }
        }
    }
}

/// Every tool the server lists.
async fn list(peer: &Peer<RoleClient>) -> std::result::Result<Vec<RemoteTool>, ServiceError> {
    let tools = peer.list_all_tools().await?;
    Ok(tools
        .into_iter()
        .map(|t| {
            let v = serde_json::to_value(&t).unwrap_or_default();
            RemoteTool {
                remote: t.name.to_string(),
                description: v["description"].as_str().unwrap_or_default().to_string(),
                schema: v
                    .get("inputSchema")
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({"type": "object"})),
            }
        })
        .collect())
}
