//! The HTTP routes and their handlers: chat completions (one JSON body, or
//! server-sent events), models, health, sessions. A completion runs as a task that
//! asks the session's agent; the handler (or, streaming, the pump that writes the
//! events) holds the turn's event receiver, so a client that goes away drops it and
//! the turn stops at the engine's next step.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::mpsc;

use super::api::ChatRequest;
use super::convert::convert;
use super::errors::ApiError;
use super::sessions::hash_after;
use super::stream::{self, CallFilter};
use super::State;
use crate::agent::{
    ask_error, unreachable, AgentEvent, CacheBytes, CallFormat, Completion, Fork, History,
    TokenLog, ToolChoice,
};
use crate::model::Message;

type Shared = AxState<Arc<State>>;

/// The server's routes.
pub(super) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(super::metrics::metrics))
        .route(
            "/v1/sessions/{id}",
            get(session_show).delete(session_delete),
        )
        .route("/v1/sessions/{id}/fork", post(session_fork))
        .fallback(|| async { ApiError::not_found("no such route", "unknown_route") })
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

fn authorize(st: &State, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.config.api_key else {
        return Ok(());
    };
    let sent = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if sent == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// The session a request names: `X-Session-Id`, `metadata.session_id`, or `user`.
fn session_name(headers: &HeaderMap, r: &ChatRequest) -> Option<String> {
    let header = headers
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    header
        .or_else(|| {
            r.metadata
                .as_ref()
                .and_then(|m| m.get("session_id"))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .or_else(|| r.user.clone().filter(|u| !u.is_empty()))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat(st: Shared, headers: HeaderMap, body: Bytes) -> Response {
    let st = st.0;
    st.counters.requests.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "http_request",
        route = "/v1/chat/completions",
        session = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let result =
        tracing::Instrument::instrument(chat_inner(st.clone(), headers, body), span.clone()).await;
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            st.counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(parent: &span, error = %e.detail.message, "request failed");
            e.into_response()
        }
    };
    span.record("status", response.status().as_u16());
    response
}

async fn chat_inner(st: Arc<State>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let req: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body is not a chat completion request: {e}"))
    })?;
    if let Some(m) = req.model.as_deref().filter(|m| *m != st.config.model_id) {
        return Err(ApiError::not_found(
            format!(
                "the model `{m}` does not exist: this server serves `{}`",
                st.config.model_id
            ),
            "model_not_found",
        )
        .param("model"));
    }
    let permit = st
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::busy(st.config.max_in_flight))?;
    let named = session_name(&headers, &req);
    let format = CallFormat::of(st.engine.model());
    let conv = convert(req, format, st.config.default_max_tokens)?;
    let (stream_it, include_usage) = (conv.stream, conv.include_usage);
    let mut complete = conv.complete;
    let messages = complete.messages.clone();
    let may_call = !complete.tools.is_empty()
        && complete.options.tool_choice.as_ref() != Some(&ToolChoice::None);
    let session = st.sessions.checkout(named.as_deref(), &messages)?;
    tracing::Span::current().record("session", session.id.as_str());
    let (tx, rx) = mpsc::unbounded_channel();
    complete.options.events = Some(tx);
    let (st2, sid) = (st.clone(), session.id.clone());
    let task = tokio::spawn(async move {
        let r = session.agent.ask(complete).await.map_err(ask_error);
        let after = r
            .as_ref()
            .ok()
            .map(|c| hash_after(&messages, &Message::assistant(c.text.clone())));
        st2.sessions.checkin(&sid, after);
        match &r {
            Ok(c) => {
                let k = &st2.counters;
                k.prompt_tokens
                    .fetch_add(c.usage.prompt_tokens as u64, Ordering::Relaxed);
                k.cached_tokens
                    .fetch_add(c.usage.cached_tokens as u64, Ordering::Relaxed);
                k.completion_tokens
                    .fetch_add(c.usage.generated_tokens as u64, Ordering::Relaxed);
                k.recomputed_tokens
                    .fetch_add(c.recomputed_tokens as u64, Ordering::Relaxed);
            }
            Err(crate::Error::Cancelled) => {
                st2.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        drop(permit);
        r
    });
    let id = format!("chatcmpl-{}-{}", session.id, now_secs());
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&session.id) {
        headers.insert("x-session-id", v);
    }
    if stream_it {
        // Wait for the first token: a request that fails before any (a prompt over
        // the context, a bad grammar) gets its status, not a 200 with an error event.
        let mut rx = rx;
        let first = rx.recv().await;
        let task = if first.is_none() {
            match task.await {
                Ok(Err(e)) => return Err(e.into()),
                done => futures::future::Either::Right(futures::future::ready(done)),
            }
        } else {
            futures::future::Either::Left(task)
        };
        let open = format.open();
        let (sse_tx, sse_rx) = mpsc::channel(64);
        let pump = Pump {
            id,
            created: now_secs(),
            model: st.config.model_id.clone(),
            filter: CallFilter::new(open, may_call),
            include_usage,
            tx: sse_tx,
        };
        tokio::spawn(pump.run(first, rx, task));
        let events = tokio_stream::wrappers::ReceiverStream::new(sse_rx);
        return Ok((headers, Sse::new(events).keep_alive(KeepAlive::default())).into_response());
    }
    let completion = wait(rx, task).await?;
    let body = stream::body(&id, now_secs(), &st.config.model_id, &completion);
    Ok((headers, Json(body)).into_response())
}

/// Drains the turn's events (holding the receiver: dropping this future cancels the
/// turn) and returns its result.
async fn wait(
    mut rx: mpsc::UnboundedReceiver<AgentEvent>,
    task: tokio::task::JoinHandle<crate::Result<Completion>>,
) -> Result<Completion, ApiError> {
    while rx.recv().await.is_some() {}
    let done = task.await.map_err(|e| {
        ApiError::from(crate::Error::AgentUnreachable {
            what: e.to_string(),
        })
    })?;
    Ok(done?)
}

/// Writes a streamed completion's events.
struct Pump {
    id: String,
    created: u64,
    model: String,
    filter: CallFilter,
    include_usage: bool,
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
}

impl Pump {
    async fn send(&self, v: serde_json::Value) -> bool {
        let ev = SseEvent::default().data(v.to_string());
        self.tx.send(Ok(ev)).await.is_ok()
    }

    async fn delta(&self, delta: serde_json::Value, finish: Option<&str>) -> bool {
        let c = stream::chunk(&self.id, self.created, &self.model, delta, finish);
        self.send(c).await
    }

    async fn run(
        mut self,
        mut first: Option<AgentEvent>,
        mut rx: mpsc::UnboundedReceiver<AgentEvent>,
        task: impl std::future::Future<
            Output = Result<crate::Result<Completion>, tokio::task::JoinError>,
        >,
    ) {
        if !self
            .delta(json!({"role": "assistant", "content": ""}), None)
            .await
        {
            return;
        }
        loop {
            let next = async {
                match first.take() {
                    Some(ev) => Some(ev),
                    None => rx.recv().await,
                }
            };
            tokio::select! {
                ev = next => match ev {
                    Some(AgentEvent::Token(t)) => {
                        let out = self.filter.push(&t);
                        if !out.is_empty() && !self.delta(json!({"content": out}), None).await {
                            // The client went away: dropping `rx` cancels the turn.
                            return;
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                () = self.tx.closed() => return,
            }
        }
        drop(rx);
        let result = match task.await {
            Ok(r) => r.map_err(ApiError::from),
            Err(e) => Err(ApiError::from(crate::Error::AgentUnreachable {
                what: e.to_string(),
            })),
        };
        match result {
            Ok(c) => {
                let finish = stream::finish_reason(&c);
                if let Some(call) = &c.tool_call {
                    let mut out = stream::tool_call(call, &self.id, Some(0));
                    let arguments = std::mem::take(&mut out.function.arguments);
                    let _ = self.delta(json!({"tool_calls": [out]}), None).await;
                    let args =
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]});
                    let _ = self.delta(args, None).await;
                } else {
                    let rest = self.filter.rest();
                    if !rest.is_empty() {
                        let _ = self.delta(json!({"content": rest}), None).await;
                    }
                }
                let _ = self.delta(json!({}), Some(finish)).await;
                if self.include_usage {
                    let u = stream::usage_chunk(&self.id, self.created, &self.model, &c.usage);
                    let _ = self.send(u).await;
                }
            }
            Err(e) => {
                let _ = self.send(e.body()).await;
            }
        }
        let _ = self.tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    }
}

async fn models(st: Shared, headers: HeaderMap) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": st.config.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "troupe",
            "context_length": st.engine.model().config().context_length,
        }],
    })))
}

async fn health(st: Shared) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "model": st.config.model_id,
        "sessions": st.sessions.len(),
        "uptime_s": st.started.elapsed().as_secs_f64(),
    }))
}

/// An agent that cannot be asked any more (a 500).
fn gone(e: impl std::fmt::Debug) -> ApiError {
    ApiError::from(unreachable(e))
}

fn unknown_session(id: &str) -> ApiError {
    ApiError::not_found(format!("no session `{id}`"), "session_not_found")
}

async fn session_show(
    st: Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let agent = st.sessions.get(&id).ok_or_else(|| unknown_session(&id))?;
    let messages = agent.ask(History).await.map_err(gone)?;
    let cache_bytes = agent.ask(CacheBytes).await.map_err(gone)?;
    let (log, cached) = agent.ask(TokenLog).await.map_err(gone)?;
    Ok(Json(json!({
        "id": id,
        "messages": messages,
        "tokens": log.len(),
        "cached_tokens": cached,
        "cache_bytes": cache_bytes,
    })))
}

async fn session_delete(
    st: Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    if !st.sessions.remove(&id) {
        return Err(unknown_session(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "session", "deleted": true}),
    ))
}

async fn session_fork(
    st: Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    authorize(&st, &headers)?;
    let agent = st.sessions.get(&id).ok_or_else(|| unknown_session(&id))?;
    let fork = agent.ask(Fork { seed_offset: 0 }).await.map_err(gone)?;
    let new = st.sessions.adopt(fork);
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": new, "object": "session", "forked_from": id})),
    ))
}
