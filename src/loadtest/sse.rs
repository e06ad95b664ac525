//! Reading a streamed chat completion: server-sent events framed out of the body's
//! bytes ([`SseParser`]), and the OpenAI-shaped chunks they carry gathered into one
//! [`Streamed`] completion: its text and tool calls, when each piece of text arrived,
//! and the token counts the server reported (`usage`, with
//! `prompt_tokens_details.cached_tokens`, or llama.cpp's `timings`).

use std::time::Instant;

use serde_json::Value;

/// Splits a byte stream into the `data` of its events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// Adds bytes; returns the data of the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            self.line(line.trim_end_matches(['\n', '\r']), &mut out);
        }
        out
    }

    /// The data of an event the stream ended inside, if any.
    pub fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8_lossy(&rest).into_owned();
            self.line(line.trim_end_matches('\r'), &mut out);
        }
        self.line("", &mut out);
        out
    }

    fn line(&mut self, line: &str, out: &mut Vec<String>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                out.push(std::mem::take(&mut self.data).join("\n"));
            }
        } else if let Some(d) = line.strip_prefix("data:") {
            self.data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
        }
        // `event:`, `id:`, `retry:` and `:` comments say nothing a completion needs.
    }
}

/// A tool call gathered from its deltas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamedCall {
    /// Its id.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments (JSON text).
    pub arguments: String,
}

/// One streamed completion, as far as it has arrived.
#[derive(Clone, Debug, Default)]
pub struct Streamed {
    /// The reply's text.
    pub content: String,
    /// Its tool calls.
    pub tool_calls: Vec<StreamedCall>,
    /// When each chunk carrying generated text (or a tool call's) arrived.
    pub token_times: Vec<Instant>,
    /// Why it ended, as the server said.
    pub finish_reason: Option<String>,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<usize>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<usize>,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: Option<usize>,
    /// llama.cpp's `timings.prompt_n`: prompt tokens computed.
    pub timings_prompt_n: Option<usize>,
    /// llama.cpp's `timings.cache_n`: prompt tokens reused.
    pub timings_cache_n: Option<usize>,
    /// llama.cpp's `timings.predicted_n`: tokens generated.
    pub timings_predicted_n: Option<usize>,
    /// The `[DONE]` event came.
    pub done: bool,
}

fn count(v: &Value, path: &[&str]) -> Option<usize> {
    let mut v = v;
    for key in path {
        v = v.get(key)?;
    }
    v.as_u64().map(|n| n as usize)
}

impl Streamed {
    /// Takes in one event's data, arrived at `at`; an error chunk is an `Err` with
    /// the server's message.
    pub fn push(&mut self, data: &str, at: Instant) -> std::result::Result<(), String> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|e| format!("a stream chunk is not JSON ({e}): {data:.200}"))?;
        if let Some(err) = chunk.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| err.to_string(), str::to_string);
            return Err(format!("the server sent an error in the stream: {msg}"));
        }
        let mut text = false;
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let delta = choice.get("delta").unwrap_or(&Value::Null);
            for key in ["content", "reasoning_content"] {
                if let Some(s) = delta.get(key).and_then(Value::as_str) {
                    if !s.is_empty() {
                        text = true;
                        if key == "content" {
                            self.content.push_str(s);
                        }
                    }
                }
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                text = true;
                self.tool_call_delta(call);
            }
            if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(f.to_string());
            }
        }
        if text {
            self.token_times.push(at);
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.prompt_tokens = count(u, &["prompt_tokens"]).or(self.prompt_tokens);
            self.completion_tokens = count(u, &["completion_tokens"]).or(self.completion_tokens);
            self.cached_tokens =
                count(u, &["prompt_tokens_details", "cached_tokens"]).or(self.cached_tokens);
        }
        if let Some(t) = chunk.get("timings").filter(|t| t.is_object()) {
            self.timings_prompt_n = count(t, &["prompt_n"]).or(self.timings_prompt_n);
            self.timings_cache_n = count(t, &["cache_n"]).or(self.timings_cache_n);
            self.timings_predicted_n = count(t, &["predicted_n"]).or(self.timings_predicted_n);
        }
        Ok(())
    }

    fn tool_call_delta(&mut self, call: &Value) {
        // Calls are numbered from 0; a wild index is taken as the next call.
        let index = count(call, &["index"])
            .unwrap_or(0)
            .min(self.tool_calls.len());
        if index == self.tool_calls.len() {
            self.tool_calls.push(StreamedCall::default());
        }
        let c = &mut self.tool_calls[index];
        if let Some(id) = call.get("id").and_then(Value::as_str) {
            c.id = id.to_string();
        }
        let f = call.get("function").unwrap_or(&Value::Null);
        if let Some(n) = f.get("name").and_then(Value::as_str) {
            c.name.push_str(n);
        }
        if let Some(a) = f.get("arguments").and_then(Value::as_str) {
            c.arguments.push_str(a);
        }
    }

    /// Tokens of the prompt: `usage`'s, else llama.cpp's computed plus reused.
    pub fn prompt(&self) -> usize {
        self.prompt_tokens.unwrap_or_else(|| {
            self.timings_prompt_n.unwrap_or(0) + self.timings_cache_n.unwrap_or(0)
        })
    }

    /// Tokens of the prompt the server reused, where it says.
    pub fn cached(&self) -> Option<usize> {
        self.cached_tokens.or(self.timings_cache_n)
    }

    /// Tokens generated: `usage`'s, else llama.cpp's, else the chunks of text.
    pub fn generated(&self) -> usize {
        self.completion_tokens
            .or(self.timings_predicted_n)
            .unwrap_or(self.token_times.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_and_line_ends() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            p.push(b":1}\r\n\r\n: keep-alive\n\ndata: x\n"),
            vec!["{\"a\":1}"]
        );
        assert_eq!(p.push(b"data: y\n\ndata:[DONE]"), vec!["x\ny"]);
        assert_eq!(p.finish(), vec!["[DONE]"]);
    }

    #[test]
    fn chunks_gather_text_calls_and_usage() {
        let t = Instant::now();
        let mut s = Streamed::default();
        for d in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"lookup","arguments":"{\"q"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":5}}}"#,
            "[DONE]",
        ] {
            s.push(d, t).unwrap();
        }
        assert_eq!(s.content, "Hello");
        assert_eq!(s.token_times.len(), 4, "the role chunk carries no text");
        assert_eq!(
            s.tool_calls,
            vec![StreamedCall {
                id: "c1".into(),
                name: "lookup".into(),
                arguments: "{\"q\":1}".into()
            }]
        );
        assert_eq!(s.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!((s.prompt(), s.cached(), s.generated()), (9, Some(5), 4));
        assert!(s.done);
        let err = s.push(r#"{"error":{"message":"boom"}}"#, t).unwrap_err();
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn llama_cpp_timings_stand_in_for_usage() {
        let mut s = Streamed::default();
        s.push(
            r#"{"choices":[{"delta":{}}],"timings":{"cache_n":30,"prompt_n":12,"predicted_n":7}}"#,
            Instant::now(),
        )
        .unwrap();
        assert_eq!((s.prompt(), s.cached(), s.generated()), (42, Some(30), 7));
    }
}
