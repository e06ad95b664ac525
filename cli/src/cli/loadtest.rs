//! `troupe loadtest`: its flags, and the runs they ask for, in process (the model
//! given by `--model`) or over HTTP (`--url`, where `--model` names the served model).

use std::path::{Path, PathBuf};

use anyhow::Context;
use troupe::loadtest::{Goodput, GrammarKind, HttpTarget, LoadtestOptions, RunReport};
use troupe::model::fetch;
use troupe::model::{GgufFile, LoadOptions, Model, Tokenizer, WeightsMode};
use troupe::KvDtype;

/// The flags of `troupe loadtest`.
#[derive(clap::Args)]
pub struct LoadtestArgs {
    /// Agents (a comma-separated list runs a sweep).
    #[arg(long, value_delimiter = ',', default_values_t = [4])]
    agents: Vec<usize>,
    /// Turns per agent.
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Tokens of the shared system prompt.
    #[arg(long, default_value_t = 200)]
    system_tokens: usize,
    /// Tokens per user message.
    #[arg(long, default_value_t = 30)]
    user_tokens: usize,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Replies do not stop at end-of-generation tokens: each has exactly
    /// --max-tokens tokens (unless a grammar ends it), as serving benchmarks run.
    #[arg(long)]
    ignore_eos: bool,
    /// Mean think time between turns, ms (exponential, seeded).
    #[arg(long, default_value_t = 0.0)]
    think_ms: f64,
    /// A simulated tool call of this many ms inside each turn.
    #[arg(long, default_value_t = 0.0)]
    tool_ms: f64,
    /// Output grammar of the replies.
    #[arg(long, value_parser = super::named::<GrammarKind>(&["none", "json", "regex"]), default_value = "none")]
    grammar: GrammarKind,
    /// Open loop: requests arrive as a Poisson process of this many per second, each
    /// taken by a free agent (default: the closed loop).
    #[arg(long, value_name = "R")]
    request_rate: Option<f64>,
    /// Most requests in flight at once (default: one per agent).
    #[arg(long, value_name = "C")]
    max_concurrency: Option<usize>,
    /// Objectives of goodput, the rate of requests meeting all of them
    /// (`ttft:MS tpot:MS e2el:MS`).
    #[arg(long, num_args = 1.., value_name = "KEY:MS")]
    goodput: Vec<String>,
    /// KV memory budget in bytes.
    #[arg(long, default_value_t = 4 << 30)]
    kv_budget: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many seconds and report what completed.
    #[arg(long)]
    duration: Option<f64>,
    /// Every turn recomputes its whole history.
    #[arg(long)]
    no_cache_reuse: bool,
    /// At most one sequence per step.
    #[arg(long)]
    no_batching: bool,
    /// Drive an OpenAI-compatible server at this URL (http://HOST:PORT) instead of
    /// the in-process engine; --model then names the served model (default: the
    /// first of its /v1/models).
    #[arg(long)]
    url: Option<String>,
    /// API key sent to --url as `Authorization: Bearer KEY`.
    #[arg(long, requires = "url")]
    api_key: Option<String>,
    /// With --url: the GGUF file (or catalogue name) whose tokenizer measures the
    /// synthetic messages (default: the default model's), so they match an
    /// in-process run of that model.
    #[arg(long, requires = "url")]
    tokenizer: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput and TTFT p95 against the number of agents (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// The tokenizer of a GGUF file, without its weights.
fn tokenizer_of(path: &Path) -> anyhow::Result<Tokenizer> {
    let file = GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?;
    Tokenizer::from_gguf(&file.content).with_context(|| format!("tokenizer of {}", path.display()))
}

/// Runs `troupe loadtest`; `model` is the global `--model`.
pub fn run(
    a: &LoadtestArgs,
    model: Option<&Path>,
    weights: WeightsMode,
    kv_dtype: Option<KvDtype>,
) -> anyhow::Result<()> {
    let duration = a
        .duration
        .map(|d| {
            std::time::Duration::try_from_secs_f64(d)
                .map_err(|e| anyhow::anyhow!("--duration {d}: {e}"))
        })
        .transpose()?;
    let goodput = if a.goodput.is_empty() {
        None
    } else {
        Some(Goodput::parse(&a.goodput)?)
    };
    let options = |agents: usize| LoadtestOptions {
        agents,
        turns: a.turns,
        system_tokens: a.system_tokens,
        user_tokens: a.user_tokens,
        max_tokens: a.max_tokens,
        think_ms: a.think_ms,
        tool_ms: a.tool_ms,
        grammar: a.grammar,
        kv_budget: a.kv_budget,
        spill: super::SPILL.get().cloned().flatten(),
        seed: a.seed,
        duration,
        no_cache_reuse: a.no_cache_reuse,
        no_batching: a.no_batching,
        progress: true,
        kv_dtype: kv_dtype.unwrap_or_default(),
        ignore_eos: a.ignore_eos,
        request_rate: a.request_rate,
        max_concurrency: a.max_concurrency,
        goodput,
        ..Default::default()
    };
    let rt = super::runtime()?;
    let mut runs: Vec<RunReport> = Vec::new();
    match &a.url {
        Some(url) => {
            let path = fetch::resolve_model_path(a.tokenizer.as_deref())?;
            let tokenizer = tokenizer_of(&path)?;
            let target = HttpTarget {
                url: url.clone(),
                api_key: a.api_key.clone(),
                model: model.map(|m| m.to_string_lossy().into_owned()),
            };
            for &n in &a.agents {
                let r = rt.block_on(troupe::loadtest::run_url(&target, &tokenizer, &options(n)))?;
                troupe::loadtest::print_table(&r);
                runs.push(r);
            }
        }
        None => {
            let path = fetch::resolve_model_path(model)?;
            let model = std::sync::Arc::new(
                Model::load(&path, LoadOptions { weights })
                    .with_context(|| format!("loading {}", path.display()))?,
            );
            for &n in &a.agents {
                let r = rt.block_on(troupe::loadtest::run(model.clone(), &options(n)))?;
                troupe::loadtest::print_table(&r);
                runs.push(r);
            }
        }
    }
    if let Some(j) = &a.json {
        let value = if runs.len() == 1 {
            serde_json::to_value(&runs[0])?
        } else {
            serde_json::json!({ "runs": runs })
        };
        super::write_json(j, &value)?;
    }
    if let Some(p) = &a.plot {
        troupe::loadtest::plot(&runs, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
