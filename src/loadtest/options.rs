//! What a load test runs: the workload's shape and the engine's settings
//! ([`LoadtestOptions`]), the bounds they must stay within, and the grammar of the
//! replies. Both the workload and the report read these; neither imports the other's
//! options.

use std::time::Duration;

use crate::engine::SchedulerConfig;
use crate::{Error, Result};

/// Output grammar of every reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrammarKind {
    /// Unconstrained.
    #[default]
    None,
    /// A small JSON Schema.
    Json,
    /// A regex.
    Regex,
}

/// The workload and the engine settings of a run.
#[derive(Clone, Debug)]
pub struct LoadtestOptions {
    /// Agents running at once.
    pub agents: usize,
    /// Turns per agent.
    pub turns: usize,
    /// Tokens of the shared system prompt.
    pub system_tokens: usize,
    /// Tokens of each user message.
    pub user_tokens: usize,
    /// Most tokens per reply.
    pub max_tokens: usize,
    /// Mean think time between turns (ms, exponential).
    pub think_ms: f64,
    /// A simulated tool call inside each turn taking this long (ms); 0: none.
    pub tool_ms: f64,
    /// Output grammar.
    pub grammar: GrammarKind,
    /// KV budget (bytes).
    pub kv_budget: usize,
    /// Spill evicted caches to this folder instead of recomputing them (see
    /// [`EngineConfig::spill`](crate::engine::EngineConfig::spill)).
    pub spill: Option<std::path::PathBuf>,
    /// Seed of everything random.
    pub seed: u64,
    /// Stop starting turns after this long, and report what completed.
    pub duration: Option<Duration>,
    /// Every turn recomputes its whole history.
    pub no_cache_reuse: bool,
    /// At most one sequence per step.
    pub no_batching: bool,
    /// Show a progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
    /// Element type of the agents' KV caches.
    pub kv_dtype: crate::kv::KvDtype,
    /// Most prefill tokens in a step while sequences decode (see
    /// [`SchedulerConfig::max_prefill_while_decoding`]).
    pub max_prefill_while_decoding: usize,
    /// Replies do not end at end-of-generation tokens: each has exactly `max_tokens`
    /// tokens (unless a grammar ends it), in-process and over HTTP (`ignore_eos`).
    pub ignore_eos: bool,
    /// Open loop: requests arrive as a Poisson process of this many per second, each
    /// taken by an agent that is free (`None`: the closed loop, each agent sends its
    /// next turn when the last one is over).
    pub request_rate: Option<f64>,
    /// Most requests in flight at once (`None`: one per agent).
    pub max_concurrency: Option<usize>,
    /// Service-level objectives a request must meet to count for goodput.
    pub goodput: Option<Goodput>,
    /// The engine's test hooks (its step gate), for the tests only.
    #[doc(hidden)]
    pub engine_hooks: crate::engine::TestHooks,
}

impl Default for LoadtestOptions {
    fn default() -> Self {
        Self {
            agents: 4,
            turns: 4,
            system_tokens: 200,
            user_tokens: 30,
            max_tokens: 64,
            think_ms: 0.0,
            tool_ms: 0.0,
            grammar: GrammarKind::None,
            kv_budget: 4 << 30,
            spill: None,
            seed: 0,
            duration: None,
            no_cache_reuse: false,
            no_batching: false,
            progress: false,
            kv_dtype: crate::kv::KvDtype::default(),
            max_prefill_while_decoding: SchedulerConfig::default().max_prefill_while_decoding,
            ignore_eos: false,
            request_rate: None,
            max_concurrency: None,
            goodput: None,
            engine_hooks: Default::default(),
        }
    }
}

/// Bounds of the counts and times of a run: beyond them a run could not finish in
/// any useful time, and its per-turn buffers would not fit in memory.
pub const LIMITS: LoadtestLimits = LoadtestLimits {
    agents: 100_000,
    turns: 1_000_000,
    agent_turns: 10_000_000,
    prompt_tokens: 1 << 20,
    millis: 86_400_000.0,
};

/// See [`LIMITS`].
#[derive(Clone, Copy, Debug)]
pub struct LoadtestLimits {
    /// Most agents.
    pub agents: usize,
    /// Most turns per agent.
    pub turns: usize,
    /// Most agents x turns.
    pub agent_turns: usize,
    /// Most tokens of the system prompt or a user message.
    pub prompt_tokens: usize,
    /// Most think or tool time, ms (a day).
    pub millis: f64,
}

impl LoadtestOptions {
    /// Rejects counts and times out of [`LIMITS`], naming the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, why: String| {
            Err(Error::Config {
                what: format!("--{what}: {why}"),
            })
        };
        let count = |what: &str, n: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&n) {
                Ok(())
            } else {
                bad(what, format!("{n} is out of range {lo}..={hi}"))
            }
        };
        count("agents", self.agents, 1, LIMITS.agents)?;
        count("turns", self.turns, 1, LIMITS.turns)?;
        count(
            "turns",
            self.agents.saturating_mul(self.turns),
            1,
            LIMITS.agent_turns,
        )?;
        count("system-tokens", self.system_tokens, 0, LIMITS.prompt_tokens)?;
        count("user-tokens", self.user_tokens, 1, LIMITS.prompt_tokens)?;
        count("max-tokens", self.max_tokens, 1, LIMITS.prompt_tokens)?;
        for (what, ms) in [("think-ms", self.think_ms), ("tool-ms", self.tool_ms)] {
            if !(ms.is_finite() && (0.0..=LIMITS.millis).contains(&ms)) {
                return bad(
                    what,
                    format!("{ms} must be a number of ms in 0..={}", LIMITS.millis),
                );
            }
        }
        if let Some(rate) = self.request_rate {
            if !(rate.is_finite() && rate > 0.0) {
                return bad(
                    "request-rate",
                    format!("{rate} must be a number of requests per second > 0"),
                );
            }
        }
        if let Some(c) = self.max_concurrency {
            count("max-concurrency", c, 1, LIMITS.agents)?;
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return bad("duration", "must be more than 0 seconds".into());
        }
        Ok(())
    }
}

/// Service-level objectives of goodput (the `--goodput ttft:MS tpot:MS e2el:MS` of
/// serving benchmarks): a request counts when it meets every one given.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Goodput {
    /// Most time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Most time per output token after the first, ms.
    pub tpot_ms: Option<f64>,
    /// Most end-to-end latency, ms.
    pub e2el_ms: Option<f64>,
}

impl Goodput {
    /// Parses `KEY:MS` pairs (keys `ttft`, `tpot`, `e2el`), naming a bad one.
    pub fn parse<S: AsRef<str>>(pairs: &[S]) -> Result<Self> {
        let bad = |why: String| Error::Config {
            what: format!("--goodput: {why}"),
        };
        let mut g = Self::default();
        for pair in pairs {
            let pair = pair.as_ref();
            let (key, ms) = pair
                .split_once(':')
                .ok_or_else(|| bad(format!("{pair:?} is not KEY:MS (ttft:500)")))?;
            let ms: f64 = ms
                .trim()
                .parse()
                .ok()
                .filter(|ms: &f64| ms.is_finite() && *ms > 0.0)
                .ok_or_else(|| bad(format!("{pair:?}: {ms:?} is not a number of ms > 0")))?;
            let slot = match key.trim() {
                "ttft" => &mut g.ttft_ms,
                "tpot" => &mut g.tpot_ms,
                "e2el" => &mut g.e2el_ms,
                other => {
                    return Err(bad(format!(
                        "unknown objective {other:?} (expected ttft, tpot or e2el)"
                    )))
                }
            };
            *slot = Some(ms);
        }
        if g == Self::default() {
            return Err(bad("no objective given (ttft:MS tpot:MS e2el:MS)".into()));
        }
        Ok(g)
    }

    /// Whether a request with these times (ms) meets every objective.
    pub fn met(&self, ttft_ms: f64, tpot_ms: f64, e2el_ms: f64) -> bool {
        let ok = |slo: Option<f64>, v: f64| slo.is_none_or(|s| v <= s);
        ok(self.ttft_ms, ttft_ms) && ok(self.tpot_ms, tpot_ms) && ok(self.e2el_ms, e2el_ms)
    }
}
