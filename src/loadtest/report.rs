//! What a load test measured: per-turn samples gathered while it runs (hdrhistogram),
//! the engine's counters at the end, a table for people, JSON for machines, and an SVG
//! plot of a sweep.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::options::{GrammarKind, LoadtestOptions};
use super::serving::{dist, RequestSample, ServingMetrics, ServingSamples};
use crate::engine::Stats;
use crate::stats::Quantiles;

/// The report of one run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunReport {
    /// The server driven over HTTP (`None`: the in-process engine).
    pub url: Option<String>,
    /// The model named in the requests over HTTP.
    pub model: Option<String>,
    /// Agents.
    pub agents: usize,
    /// Turns per agent asked for.
    pub turns: usize,
    /// Grammar of the replies.
    pub grammar: GrammarKind,
    /// Whether cache reuse was off.
    pub no_cache_reuse: bool,
    /// Whether batching was off.
    pub no_batching: bool,
    /// Whether replies ignored end-of-generation tokens.
    pub ignore_eos: bool,
    /// Open-loop arrival rate, requests/s (`None`: closed loop).
    pub request_rate: Option<f64>,
    /// Most requests in flight.
    pub max_concurrency: Option<usize>,
    /// Completed turns.
    pub requests: u64,
    /// Failed turns.
    pub errors: u64,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Completed turns per turn index.
    pub requests_by_turn: Vec<u64>,
    /// Wall time of the run.
    pub wall_s: f64,
    /// Generated tokens per second.
    pub gen_tok_s: f64,
    /// Prompt plus generated tokens per second.
    pub total_tok_s: f64,
    /// Time to first token of a request.
    pub ttft_ms: Quantiles,
    /// Time to first token of the first request of turns after the first.
    pub ttft_later_ms: Quantiles,
    /// Time to first token by turn index (the first
    /// [`TTFT_BY_TURN_MAX`](super::serving::TTFT_BY_TURN_MAX) turns).
    pub ttft_by_turn_ms: Vec<Quantiles>,
    /// Time per output token after the first, per request.
    pub tpot_ms: Quantiles,
    /// Time between streamed tokens (chunks, over HTTP).
    pub itl_ms: Quantiles,
    /// End-to-end latency of a request.
    pub e2el_ms: Quantiles,
    /// Whole turn (its requests and tool calls).
    pub turn_ms: Quantiles,
    /// Wait for admission: in the model actor in-process; over HTTP, from a request's
    /// arrival (open loop) or a free slot (`--max-concurrency`) to its sending.
    pub queue_ms: Quantiles,
    /// Mean sequences per step.
    pub batch_mean: f64,
    /// Most sequences in a step.
    pub batch_max: usize,
    /// Steps the engine ran.
    pub steps: u64,
    /// Each step's rows and the KV bytes live, over time.
    pub timeline: Vec<crate::engine::StepSample>,
    /// Prompt tokens of all turns.
    pub prompt_tokens: u64,
    /// Prompt tokens reused from caches (over HTTP: what servers reported).
    pub reused_tokens: u64,
    /// Prompt tokens computed (`prompt_tokens - reused_tokens`).
    pub computed_tokens: u64,
    /// `computed_tokens / prompt_tokens`.
    pub computed_ratio: f64,
    /// Requests whose server reported the tokens it reused (all of them in-process;
    /// over HTTP those with `usage.prompt_tokens_details.cached_tokens` or llama.cpp's
    /// `timings.cache_n`).
    pub cache_reported_requests: u64,
    /// Generated tokens.
    pub generated_tokens: u64,
    /// Peak KV bytes of live caches.
    pub kv_peak_bytes: usize,
    /// Evictions the model actor asked for, plus preemptions.
    pub evictions: u64,
    /// Tokens recomputed after evictions.
    pub recomputed_tokens: u64,
    /// Whether evicted caches were spilled to disk (`--spill`).
    pub spill: bool,
    /// Caches written to spill files, and their bytes.
    pub spills: u64,
    /// Bytes written to spill files.
    pub spilled_bytes: u64,
    /// Spill writes that failed (recomputed instead).
    pub spill_failures: u64,
    /// Model calls whose cache was read back from a spill file (plus those taken
    /// back while still being written).
    pub restores: u64,
    /// Spill files that could not be read back (recomputed instead).
    pub restore_failures: u64,
    /// Prompt tokens read back from spill files instead of recomputed.
    pub restored_tokens: u64,
    /// Time a model call waited for its cache to be read back.
    pub restore_ms: Quantiles,
    /// Grammar mask time.
    pub mask_us: Quantiles,
    /// Peak resident memory of the process.
    pub rss_peak_bytes: u64,
    /// The serving-benchmark figures, flat under their usual names.
    #[serde(flatten)]
    pub serving: ServingMetrics,
    /// Each completed turn's token counts, in completion order (kept out of the JSON
    /// report: one row per turn would dwarf it).
    #[serde(skip)]
    pub turn_records: Vec<TurnRecord>,
}

/// The token counts of one completed turn of one agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TurnRecord {
    /// Index of the agent.
    pub agent: usize,
    /// Index of the turn in the agent's conversation.
    pub turn: usize,
    /// Tokens of context before generation (cached plus new), summed over the turn's
    /// model calls.
    pub prompt_tokens: usize,
    /// Of those, tokens already in the agent's cache.
    pub reused_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
}

/// One completed turn, as the workloads hand it to the [`Recorder`].
pub(super) struct TurnDone {
    /// Its token counts (the sums over its requests).
    pub record: TurnRecord,
    /// Its requests, in order.
    pub requests: Vec<RequestSample>,
    /// Wall time of the whole turn.
    pub elapsed: Duration,
    /// Time it waited for admission.
    pub queue: Duration,
    /// Tokens recomputed after an eviction.
    pub recomputed: usize,
    /// Tokens read back from spilled caches instead of recomputed.
    pub restored: usize,
}

struct Samples {
    ttft_later: Histogram<u64>,
    turn: Histogram<u64>,
    queue: Histogram<u64>,
    serving: ServingSamples,
    report: RunReport,
}

/// Collects samples from the agents' tasks.
pub(super) struct Recorder {
    samples: Mutex<Samples>,
    bar: indicatif::ProgressBar,
    start: Instant,
}

fn hist() -> Histogram<u64> {
    // Microseconds up to an hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 3_600_000_000)
}

impl Recorder {
    pub(super) fn new(o: &LoadtestOptions, progress: bool) -> Self {
        let bar = if progress {
            let b = indicatif::ProgressBar::with_draw_target(
                Some((o.agents * o.turns) as u64),
                indicatif::ProgressDrawTarget::stderr(),
            );
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} turns {msg} [{elapsed}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        Self {
            samples: Mutex::new(Samples {
                ttft_later: hist(),
                turn: hist(),
                queue: hist(),
                serving: ServingSamples::new(o.turns, o.goodput),
                report: RunReport {
                    requests_by_turn: vec![0; o.turns],
                    ..RunReport::default()
                },
            }),
            bar,
            start: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a completed turn and its requests.
    pub(super) fn turn(&self, t: TurnDone) {
        let mut s = self.lock();
        let turn = t.record.turn;
        for (i, r) in t.requests.iter().enumerate() {
            let ttft = s.serving.add(turn, r);
            if i == 0 && turn > 0 {
                let _ = s.ttft_later.record(us(ttft));
            }
            if r.cached_tokens.is_some() {
                s.report.cache_reported_requests += 1;
            }
        }
        let _ = s.turn.record(us(t.elapsed));
        let _ = s.queue.record(us(t.queue));
        let rep = &mut s.report;
        rep.requests += 1;
        if let Some(c) = rep.requests_by_turn.get_mut(turn) {
            *c += 1;
        }
        rep.prompt_tokens += t.record.prompt_tokens as u64;
        rep.reused_tokens += t.record.reused_tokens as u64;
        rep.generated_tokens += t.record.generated_tokens as u64;
        rep.recomputed_tokens += t.recomputed as u64;
        rep.restored_tokens += t.restored as u64;
        rep.turn_records.push(t.record);
        let (done, errors, generated) = (rep.requests, rep.errors, rep.generated_tokens);
        drop(s);
        self.bar.inc(1);
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "{:.1} tok/s, {errors} errors ({done} done)",
            generated as f64 / secs
        ));
    }

    /// Records a failed turn (`requests` of its requests failed) and why.
    pub(super) fn error(&self, requests: usize, what: String) {
        let mut s = self.lock();
        s.report.errors += 1;
        s.report.first_error.get_or_insert(what);
        for _ in 0..requests {
            s.serving.fail();
        }
        drop(s);
        self.bar.inc(1);
    }

    /// The report of a run of `wall`, with the engine's counters when it ran in
    /// process.
    pub(super) fn report(
        &self,
        o: &LoadtestOptions,
        wall: Duration,
        stats: Option<&Stats>,
    ) -> RunReport {
        self.bar.finish_and_clear();
        let s = self.lock();
        let mut r = s.report.clone();
        r.agents = o.agents;
        r.turns = o.turns;
        r.grammar = o.grammar;
        r.no_cache_reuse = o.no_cache_reuse;
        r.no_batching = o.no_batching;
        r.ignore_eos = o.ignore_eos;
        r.request_rate = o.request_rate;
        r.max_concurrency = o.max_concurrency;
        r.wall_s = wall.as_secs_f64();
        r.computed_tokens = r.prompt_tokens.saturating_sub(r.reused_tokens);
        r.computed_ratio = if r.prompt_tokens == 0 {
            0.0
        } else {
            r.computed_tokens as f64 / r.prompt_tokens as f64
        };
        r.gen_tok_s = r.generated_tokens as f64 / r.wall_s.max(1e-9);
        r.total_tok_s = (r.generated_tokens + r.prompt_tokens) as f64 / r.wall_s.max(1e-9);
        r.serving = s.serving.metrics(wall);
        r.ttft_ms = r.serving.ttft_ms.q;
        r.tpot_ms = r.serving.tpot_ms.q;
        r.itl_ms = r.serving.itl_ms.q;
        r.e2el_ms = r.serving.e2el_ms.q;
        r.ttft_by_turn_ms = s.serving.ttft_by_turn();
        r.ttft_later_ms = dist(&s.ttft_later).q;
        r.turn_ms = dist(&s.turn).q;
        r.queue_ms = dist(&s.queue).q;
        if let Some(stats) = stats {
            r.batch_mean = stats.mean_batch();
            r.batch_max = stats.max_batch();
            r.steps = stats.steps;
            r.timeline = stats.timeline.clone();
            r.kv_peak_bytes = stats.kv_peak_bytes;
            r.evictions = stats.evictions_requested + stats.preempted;
            r.mask_us = stats.mask_us;
            r.spills = stats.spills;
            r.spilled_bytes = stats.spilled_bytes;
            r.spill_failures = stats.spill_failures;
            r.restores = stats.restores + stats.restores_in_memory;
            r.restore_failures = stats.restore_failures;
            r.restore_ms = stats.restore_ms;
        }
        r.spill = o.spill.is_some();
        r.rss_peak_bytes = rss_peak();
        r
    }
}

/// Peak resident set of this process (Linux `VmHWM`), 0 when unknown.
fn rss_peak() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Prints one run as a table.
pub fn print_table(r: &RunReport) {
    let ql = |q: &Quantiles| {
        format!(
            "{:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            q.mean, q.p50, q.p90, q.p95, q.p99
        )
    };
    let mut flags = String::new();
    for (on, what) in [
        (r.no_cache_reuse, ", no cache reuse"),
        (r.no_batching, ", no batching"),
        (r.ignore_eos, ", ignore eos"),
    ] {
        if on {
            flags.push_str(what);
        }
    }
    if let Some(rate) = r.request_rate {
        flags.push_str(&format!(", open loop {rate} req/s"));
    }
    if let Some(c) = r.max_concurrency {
        flags.push_str(&format!(", max concurrency {c}"));
    }
    match &r.url {
        Some(url) => println!(
            "{url} (model {}): agents {} x turns {} (grammar {:?}{flags})",
            r.model.as_deref().unwrap_or("?"),
            r.agents,
            r.turns,
            r.grammar
        ),
        None => println!(
            "agents {} x turns {} (grammar {:?}{flags})",
            r.agents, r.turns, r.grammar
        ),
    }
    let sv = &r.serving;
    println!(
        "  turns {} ({} errors) in {:.1} s: {:.1} generated tok/s, {:.1} total tok/s",
        r.requests, r.errors, r.wall_s, r.gen_tok_s, r.total_tok_s
    );
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
    println!(
        "  requests {} ({} failed): request_throughput {:.2}/s, output_throughput {:.1} tok/s, total_token_throughput {:.1} tok/s{}",
        sv.completed,
        sv.failed,
        sv.request_throughput,
        sv.output_throughput,
        sv.total_token_throughput,
        sv.request_goodput
            .map_or(String::new(), |g| format!(", request_goodput {g:.2}/s"))
    );
    println!("  latency (ms)           mean   median      p90      p95      p99");
    println!("  ttft              {}", ql(&r.ttft_ms));
    println!("  ttft, later turns {}", ql(&r.ttft_later_ms));
    println!("  tpot              {}", ql(&r.tpot_ms));
    println!("  itl               {}", ql(&r.itl_ms));
    println!("  e2el              {}", ql(&r.e2el_ms));
    println!("  turn              {}", ql(&r.turn_ms));
    println!("  queue             {}", ql(&r.queue_ms));
    let by_turn: Vec<String> = r
        .ttft_by_turn_ms
        .iter()
        .map(|q| format!("{:.0}", q.p50))
        .collect();
    println!("  ttft median by turn: {}", by_turn.join(" "));
    if r.url.is_none() {
        println!("  batch mean {:.1}, max {}", r.batch_mean, r.batch_max);
    }
    println!(
        "  prompt tokens {}: reused {}, computed {} ({:.0}%); generated {}{}",
        r.prompt_tokens,
        r.reused_tokens,
        r.computed_tokens,
        r.computed_ratio * 100.0,
        r.generated_tokens,
        if r.url.is_some() {
            format!(
                " (reuse reported by the server for {} of {} requests)",
                r.cache_reported_requests, sv.completed
            )
        } else {
            String::new()
        }
    );
    if r.url.is_none() {
        println!(
            "  KV peak {:.1} MiB, evictions {}, recomputed tokens {}, mask p50/p99 {:.0}/{:.0} µs, RSS peak {:.0} MiB",
            r.kv_peak_bytes as f64 / (1 << 20) as f64,
            r.evictions,
            r.recomputed_tokens,
            r.mask_us.p50,
            r.mask_us.p99,
            r.rss_peak_bytes as f64 / (1 << 20) as f64
        );
    }
    if r.spill {
        println!(
            "  spilled {} caches ({:.1} MiB, {} failed), restored {} ({} tokens, {} failed), restore p50/p99 {:.1}/{:.1} ms",
            r.spills,
            r.spilled_bytes as f64 / (1 << 20) as f64,
            r.spill_failures,
            r.restores,
            r.restored_tokens,
            r.restore_failures,
            r.restore_ms.p50,
            r.restore_ms.p99
        );
    }
}

/// Draws generated tokens/s and TTFT p95 against the number of agents (SVG).
pub fn plot(runs: &[RunReport], path: &std::path::Path) -> crate::Result<()> {
    use plotters::prelude::*;
    let err = |e: String| crate::Error::Report {
        what: format!("plot {}: {e}", path.display()),
    };
    let root = SVGBackend::new(path, (900, 840)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (top, bottom) = root.split_vertically(420);
    let (left, right) = top.split_horizontally(450);
    let max_n = runs.iter().map(|r| r.agents).max().unwrap_or(1) as f64;
    for (area, title, f) in [
        (
            &left,
            "generated tok/s",
            (|r: &RunReport| r.gen_tok_s) as fn(&RunReport) -> f64,
        ),
        (&right, "TTFT p95 (ms)", |r: &RunReport| r.ttft_ms.p95),
    ] {
        let max_y = runs.iter().map(f).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..max_n * 1.05, 0f64..max_y)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("agents")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(
                runs.iter().map(|r| (r.agents as f64, f(r))),
                &BLUE,
            ))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(
                runs.iter()
                    .map(|r| Circle::new((r.agents as f64, f(r)), 3, BLUE.filled())),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    // Over time: each run's batch size and KV bytes live, step by step.
    let (left, right) = bottom.split_horizontally(450);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let max_t = runs
        .iter()
        .filter_map(|r| r.timeline.last().map(|s| s.at_ms / 1e3))
        .fold(1e-3, f64::max);
    for (area, title, f) in [
        (
            &left,
            "batch size (sequences per step)",
            (|s: &crate::engine::StepSample| s.rows as f64)
                as fn(&crate::engine::StepSample) -> f64,
        ),
        (&right, "KV live (MiB)", |s: &crate::engine::StepSample| {
            s.kv_live_bytes as f64 / (1 << 20) as f64
        }),
    ] {
        let max_y = runs
            .iter()
            .flat_map(|r| r.timeline.iter().map(f))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..max_t * 1.02, 0f64..max_y)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, r) in runs.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    r.timeline.iter().map(|s| (s.at_ms / 1e3, f(s))),
                    &color,
                ))
                .map_err(|e| err(e.to_string()))?
                .label(format!("{} agents", r.agents))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
