//! `troupe loadtest --url`: the same multi-turn agents driven over HTTP against any
//! OpenAI-compatible server (troupe serve, llama.cpp's llama-server, vLLM, SGLang).
//! Each simulated agent keeps its messages and resends them in full each turn to
//! `POST {url}/v1/chat/completions` (streamed, with `stream_options.include_usage`
//! and an `X-Session-Id` header of its own, which troupe serve and a proxy route
//! on); with `--tool-ms` a turn is a forced `lookup` call, the pause, the tool's
//! result and the answer. Token counts come from what the server reports.
//!
//! The client is hyper's (plain HTTP/1.1 with a connection pool, no TLS): the same
//! HTTP stack the server side uses, no second one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use super::arrivals::Arrivals;
use super::options::{GrammarKind, LoadtestOptions};
use super::report::{Recorder, RunReport, TurnDone, TurnRecord};
use super::serving::RequestSample;
use super::sse::{SseParser, Streamed};
use super::workload::{grammar, join_until, lookup_result, sampling, texts, think, think_seed};
use crate::grammar::Grammar;
use crate::model::Tokenizer;
use crate::{Error, Result};

/// The server a load test drives.
#[derive(Clone, Debug, Default)]
pub struct HttpTarget {
    /// Its base URL, `http://host:port` (a path prefix, and a trailing `/v1`, are
    /// allowed).
    pub url: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The model to name in the requests (`None`: the first of `GET /v1/models`).
    pub model: Option<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What every request of the run shares.
struct Shared {
    client: HttpClient,
    /// `{base}/v1/chat/completions`.
    endpoint: Uri,
    url: String,
    auth: Option<String>,
    model: String,
}

fn http_err(url: &str, what: impl std::fmt::Display) -> Error {
    Error::Http {
        url: url.to_string(),
        what: what.to_string(),
    }
}

/// An error and its sources, `a: b: c` (hyper's own message says little).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut at = e.source();
    while let Some(c) = at {
        s.push_str(": ");
        s.push_str(&c.to_string());
        at = c.source();
    }
    s
}

/// The base URL without a trailing `/` or `/v1`; only plain HTTP.
fn base_url(url: &str) -> Result<String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| http_err(url, format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(http_err(
                url,
                "https is not supported (the client is plain HTTP): use http://, or a local proxy",
            ))
        }
        _ => return Err(http_err(url, "expected http://HOST:PORT")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(http_err(url, "no host"));
    }
    let base = url.trim_end_matches('/');
    Ok(base.strip_suffix("/v1").unwrap_or(base).to_string())
}

impl Shared {
    /// A request to `uri`; a completion's carries the agent's session.
    fn request(
        &self,
        method: Method,
        uri: Uri,
        body: Bytes,
        session: Option<&str>,
    ) -> Result<Request<Full<Bytes>>> {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(session) = session {
            req = req
                .header(CONTENT_TYPE, "application/json")
                .header("accept", "text/event-stream")
                .header("x-session-id", session);
        }
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a);
        }
        req.body(Full::new(body))
            .map_err(|e| http_err(&self.url, format!("building a request: {e}")))
    }

    /// Posts one streamed completion, reading it chunk by chunk.
    async fn complete(&self, body: &Value, session: &str) -> Result<(Streamed, Instant, Instant)> {
        let bytes = Bytes::from(serde_json::to_vec(body).map_err(|e| http_err(&self.url, e))?);
        let req = self.request(Method::POST, self.endpoint.clone(), bytes, Some(session))?;
        let sent = Instant::now();
        let resp = self.client.request(req).await.map_err(|e| {
            http_err(
                &self.url,
                format!("POST /v1/chat/completions: {}", chain(&e)),
            )
        })?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let text = body
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(http_err(
                &self.url,
                format!("POST /v1/chat/completions: {status}: {text:.500}"),
            ));
        }
        let mut parser = SseParser::default();
        let mut out = Streamed::default();
        let read_err = |e: String| http_err(&self.url, e);
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| read_err(format!("reading the stream: {}", chain(&e))))?;
            let at = Instant::now();
            if let Some(data) = frame.data_ref() {
                for event in parser.push(data) {
                    out.push(&event, at).map_err(read_err)?;
                }
            }
        }
        let end = Instant::now();
        for event in parser.finish() {
            out.push(&event, end).map_err(read_err)?;
        }
        if !out.done && out.finish_reason.is_none() {
            return Err(read_err(
                "the stream ended before a finish_reason or [DONE]".into(),
            ));
        }
        Ok((out, sent, end))
    }

    /// The first model the server lists.
    async fn first_model(&self) -> Result<String> {
        let uri: Uri = format!("{}/v1/models", self.url)
            .parse()
            .map_err(|e| http_err(&self.url, format!("not a URL ({e})")))?;
        let req = self.request(Method::GET, uri, Bytes::new(), None)?;
        let resp = self.client.request(req).await.map_err(|e| {
            http_err(
                &self.url,
                format!("GET /v1/models (to find the model; or pass --model NAME): {e}"),
            )
        })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http_err(&self.url, format!("GET /v1/models: {e}")))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        v.pointer("/data/0/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                http_err(
                    &self.url,
                    format!("GET /v1/models ({status}) names no model: pass --model NAME"),
                )
            })
    }
}

/// The `lookup` tool of the workload, as OpenAI's API declares tools.
fn lookup_tool() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Looks something up.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"]
            }
        }
    }])
}

/// The body of one request; `tool_choice` only when the workload has the tool.
fn body(
    shared: &Shared,
    o: &LoadtestOptions,
    agent: usize,
    messages: &[Value],
    tool_choice: Option<Value>,
) -> Value {
    let s = sampling(o, agent);
    let mut b = json!({
        "model": shared.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": o.max_tokens,
        "temperature": s.temperature,
        "seed": s.seed,
    });
    if o.ignore_eos {
        b["ignore_eos"] = json!(true);
    }
    if let Some(choice) = tool_choice {
        b["tools"] = lookup_tool();
        b["tool_choice"] = choice;
    }
    if let Some(Grammar::JsonSchema(schema)) = grammar(o.grammar) {
        b["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": true}
        });
    }
    b
}

/// A session id no earlier run used (a server keeps sessions across runs).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("lt{:x}{:x}", nanos, std::process::id())
}

/// Runs one load test against the server at `target.url`, with texts measured by
/// `tokenizer` (the same texts as the in-process run of the same options).
pub async fn run_url(
    target: &HttpTarget,
    tokenizer: &Tokenizer,
    o: &LoadtestOptions,
) -> Result<RunReport> {
    o.validate()?;
    let refuse = |what: &str| {
        Err(Error::Config {
            what: format!("--{what} is for the in-process engine, not for --url"),
        })
    };
    if o.no_cache_reuse {
        return refuse("no-cache-reuse");
    }
    if o.no_batching {
        return refuse("no-batching");
    }
    if o.grammar == GrammarKind::Regex {
        return Err(Error::Config {
            what: "--grammar regex: OpenAI's API has no regex constraint (use json or none with --url)".into(),
        });
    }
    let url = base_url(&target.url)?;
    let endpoint: Uri = format!("{url}/v1/chat/completions")
        .parse()
        .map_err(|e| http_err(&url, format!("not a URL ({e})")))?;
    let mut shared = Shared {
        // A connection per request: a server may close a kept-alive connection
        // between turns (llama-server did, mid-run), and a request sent on it fails;
        // on loopback a connect costs microseconds against a completion's seconds.
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http(),
        endpoint,
        url: url.clone(),
        auth: target.api_key.as_ref().map(|k| format!("Bearer {k}")),
        model: target.model.clone().unwrap_or_default(),
    };
    if target.model.is_none() {
        shared.model = shared.first_model().await?;
    }
    let shared = Arc::new(shared);
    let (system, texts) = texts(tokenizer, o)?;
    let recorder = Arc::new(Recorder::new(o, o.progress));
    let arrivals = Arc::new(Arrivals::new(o));
    let run = run_id();
    let start = Instant::now();
    let deadline = o.duration.map(|d| start + d);
    let mut tasks = Vec::new();
    for (i, msgs) in texts.into_iter().enumerate() {
        let (shared, recorder, arrivals, o) = (
            shared.clone(),
            recorder.clone(),
            arrivals.clone(),
            o.clone(),
        );
        let session = format!("{run}-agent-{i}");
        let mut history: Vec<Value> = Vec::new();
        if !system.is_empty() {
            history.push(json!({"role": "system", "content": system}));
        }
        tasks.push(tokio::spawn(async move {
            let mut think_rng = StdRng::seed_from_u64(think_seed(&o, i));
            for (turn, text) in msgs.into_iter().enumerate() {
                think(&o, turn, &mut think_rng).await;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let Some(admitted) = arrivals.admit().await else {
                    break;
                };
                let queue = admitted.arrived.elapsed();
                let before = history.len();
                history.push(json!({"role": "user", "content": text}));
                let began = Instant::now();
                match agent_turn(&shared, &o, i, &session, &mut history).await {
                    Ok(requests) => {
                        let sum = |f: fn(&RequestSample) -> usize| requests.iter().map(f).sum();
                        recorder.turn(TurnDone {
                            record: TurnRecord {
                                agent: i,
                                turn,
                                prompt_tokens: sum(|r| r.prompt_tokens),
                                reused_tokens: sum(|r| r.cached_tokens.unwrap_or(0)),
                                generated_tokens: sum(|r| r.generated_tokens),
                            },
                            elapsed: began.elapsed(),
                            requests,
                            queue,
                            recomputed: 0,
                            restored: 0,
                        });
                    }
                    Err((failed, e)) => {
                        history.truncate(before);
                        recorder.error(failed, e.to_string());
                    }
                }
            }
        }));
    }
    join_until(tasks, deadline).await;
    let wall = start.elapsed();
    let mut r = recorder.report(o, wall, None);
    r.url = Some(url);
    r.model = Some(shared.model.clone());
    Ok(r)
}

/// One turn of agent `i` (its user message already in `history`): one request, or
/// with the tool a forced call, the pause, the result and the answer. Appends the
/// replies to `history`; on failure, how many requests it made.
async fn agent_turn(
    shared: &Shared,
    o: &LoadtestOptions,
    i: usize,
    session: &str,
    history: &mut Vec<Value>,
) -> std::result::Result<Vec<RequestSample>, (usize, Error)> {
    let mut requests = Vec::new();
    let with_tool = o.tool_ms > 0.0;
    let mut choice = with_tool.then(|| json!({"type": "function", "function": {"name": "lookup"}}));
    loop {
        let calling = choice.as_ref().is_some_and(|c| c.is_object());
        let b = body(shared, o, i, history, choice.clone());
        let (s, sent, end) = shared
            .complete(&b, session)
            .await
            .map_err(|e| (requests.len() + 1, e))?;
        requests.push(RequestSample {
            sent,
            token_times: s.token_times.clone(),
            end,
            prompt_tokens: s.prompt(),
            cached_tokens: s.cached(),
            generated_tokens: s.generated(),
        });
        if calling && !s.tool_calls.is_empty() {
            let calls: Vec<Value> = s
                .tool_calls
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    json!({
                        "id": if c.id.is_empty() { format!("call_{k}") } else { c.id.clone() },
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments}
                    })
                })
                .collect();
            history.push(json!({"role": "assistant", "content": Value::Null, "tool_calls": calls}));
            tokio::time::sleep(Duration::from_secs_f64(o.tool_ms / 1e3)).await;
            for call in &calls {
                let args = call["function"]["arguments"].as_str().unwrap_or("");
                let query = serde_json::from_str::<Value>(args)
                    .ok()
                    .and_then(|a| a.get("query").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| args.to_string());
                history.push(json!({
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": lookup_result(&query)
                }));
            }
            choice = Some(json!("none"));
            continue;
        }
        history.push(json!({"role": "assistant", "content": s.content}));
        return Ok(requests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(base_url("http://h:1/v1/").unwrap(), "http://h:1");
        assert_eq!(base_url("http://h:1/proxy").unwrap(), "http://h:1/proxy");
        for bad in ["https://h:1", "h:1", "not a url", "ftp://h"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }
}
