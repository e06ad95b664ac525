//! Running one tool call so that it cannot break the turn: a timeout that aborts the
//! tool's task, panics caught, and the result (or error) capped in size with a
//! visible marker. Agent-as-tool calls carry the chain of agents that asked, so that
//! a cycle (A asks B asks A) is refused instead of waiting for a timeout.

use std::time::{Duration, Instant};

use kameo::actor::ActorId;

use super::config::MAX_TOOL_TIMEOUT_SECS;
use super::tools::{ToolCall, ToolRun};
use super::AgentActor;

tokio::task_local! {
    /// The agents whose tool call is running in this task, outermost first.
    static TOOL_CALLERS: Vec<ActorId>;
}

/// The agents whose tool calls led to the running tool (empty outside a tool).
pub(crate) fn tool_callers() -> Vec<ActorId> {
    TOOL_CALLERS.try_with(Clone::clone).unwrap_or_default()
}

/// `text` cut to at most `max` bytes (at a character boundary), ending with
/// `…[truncated N bytes]` when it was longer.
pub fn cap_text(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker_room = 32;
    let mut cut = max.saturating_sub(marker_room);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…[truncated {} bytes]", &text[..cut], text.len() - cut)
}

impl AgentActor {
    /// Runs one tool call with the timeout; errors, timeouts and panics become the
    /// text the model sees, capped at `max_tool_result_bytes`.
    pub(super) async fn run_tool(&self, call: ToolCall) -> ToolRun {
        let span = tracing::info_span!(
            "tool_call",
            agent = %self.config.name,
            tool = %call.name,
            outcome = tracing::field::Empty,
            ms = tracing::field::Empty,
        );
        let run = tracing::Instrument::instrument(self.run_tool_inner(call), span.clone()).await;
        span.record("outcome", if run.failed { "error" } else { "ok" });
        span.record("ms", run.seconds * 1e3);
        run
    }

    async fn run_tool_inner(&self, call: ToolCall) -> ToolRun {
        let start = Instant::now();
        let secs = self
            .config
            .tool_timeout_secs
            .clamp(0.001, MAX_TOOL_TIMEOUT_SECS);
        let timeout = Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(30));
        let (result, failed) = match self.tools.iter().find(|t| t.name() == call.name) {
            None => (format!("error: unknown tool `{}`", call.name), true),
            Some(tool) => {
                // A tool that panics while building its future is as harmless as one
                // that panics inside it (that one is caught by the task).
                let args = call.arguments.clone();
                let fut =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tool.call(args)))
                        .unwrap_or_else(|_| {
                            Box::pin(async { panic!("tool panicked before running") })
                        });
                let mut chain = self.turn_state.asked_by.clone();
                if let Some(me) = &self.holder {
                    chain.push(me.id());
                }
                let mut task = tokio::spawn(TOOL_CALLERS.scope(chain, fut));
                match tokio::time::timeout(timeout, &mut task).await {
                    Ok(Ok(Ok(text))) => (text, false),
                    Ok(Ok(Err(e))) => (format!("error: {e}"), true),
                    Ok(Err(join)) => (
                        format!(
                            "error: tool `{}` crashed{}",
                            call.name,
                            if join.is_panic() { " (panic)" } else { "" }
                        ),
                        true,
                    ),
                    Err(_) => {
                        // Stopped, not left running: an agent tool's ask is dropped
                        // with it, and the asked agent skips or stops its turn.
                        task.abort();
                        (
                            format!(
                                "error: tool `{}` timed out after {:.1} s",
                                call.name,
                                timeout.as_secs_f64()
                            ),
                            true,
                        )
                    }
                }
            }
        };
        ToolRun {
            call,
            result: cap_text(result, self.config.max_tool_result_bytes),
            failed,
            seconds: start.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cap_text;

    #[test]
    fn long_results_are_cut_with_a_marker() {
        assert_eq!(cap_text("short".into(), 100), "short");
        let long = "é".repeat(5000);
        let cut = cap_text(long.clone(), 4096);
        assert!(cut.len() <= 4096, "{}", cut.len());
        assert!(cut.ends_with("bytes]"), "{}", &cut[cut.len() - 40..]);
        let kept = cut.split('…').next().unwrap();
        assert!(long.starts_with(kept));
        assert!(cut.contains(&format!("[truncated {} bytes]", long.len() - kept.len())));
    }
}
