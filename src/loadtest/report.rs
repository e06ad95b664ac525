//! What a load test measured: per-turn samples gathered while it runs (hdrhistogram),
//! the engine's counters at the end, a table for people, JSON for machines, and an SVG
//! plot of a sweep.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::options::{GrammarKind, LoadtestOptions};
use crate::agent::AgentReply;
use crate::engine::Stats;
use crate::stats::Quantiles;

/// The report of one run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunReport {
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
    /// Completed turns.
    pub requests: u64,
    /// Failed turns.
    pub errors: u64,
    /// Completed turns per turn index.
    pub requests_by_turn: Vec<u64>,
    /// Wall time of the run.
    pub wall_s: f64,
    /// Generated tokens per second.
    pub gen_tok_s: f64,
    /// Prompt plus generated tokens per second.
    pub total_tok_s: f64,
    /// Time to first token of a turn.
    pub ttft_ms: Quantiles,
    /// Time to first token of turns after the first.
    pub ttft_later_ms: Quantiles,
    /// Time between streamed tokens.
    pub itl_ms: Quantiles,
    /// Whole turn.
    pub turn_ms: Quantiles,
    /// Wait for admission in the model actor.
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
    /// Prompt tokens reused from caches.
    pub reused_tokens: u64,
    /// Prompt tokens computed (`prompt_tokens - reused_tokens`).
    pub computed_tokens: u64,
    /// `computed_tokens / prompt_tokens`.
    pub computed_ratio: f64,
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
    /// Tokens of context before generation (cached plus new).
    pub prompt_tokens: usize,
    /// Of those, tokens already in the agent's cache.
    pub reused_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
}

struct Samples {
    ttft: Histogram<u64>,
    ttft_later: Histogram<u64>,
    itl: Histogram<u64>,
    turn: Histogram<u64>,
    queue: Histogram<u64>,
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
    (d.as_micros() as u64).max(1)
}

fn q(h: &Histogram<u64>) -> Quantiles {
    let at = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(p) as f64 / 1e3
        }
    };
    Quantiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
    }
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
                ttft: hist(),
                ttft_later: hist(),
                itl: hist(),
                turn: hist(),
                queue: hist(),
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

    pub(super) fn turn(
        &self,
        (agent, turn): (usize, usize),
        r: &AgentReply,
        sent: Instant,
        token_times: &[Instant],
    ) {
        let mut s = self.lock();
        let ttft = token_times.first().map_or(r.ttft, |t| *t - sent);
        let _ = s.ttft.record(us(ttft));
        if turn > 0 {
            let _ = s.ttft_later.record(us(ttft));
        }
        for w in token_times.windows(2) {
            let _ = s.itl.record(us(w[1] - w[0]));
        }
        let _ = s.turn.record(us(r.elapsed));
        let _ = s.queue.record(us(r.queue));
        let rep = &mut s.report;
        rep.requests += 1;
        if let Some(c) = rep.requests_by_turn.get_mut(turn) {
            *c += 1;
        }
        rep.prompt_tokens += r.usage.prompt_tokens as u64;
        rep.reused_tokens += r.usage.cached_tokens as u64;
        rep.generated_tokens += r.usage.generated_tokens as u64;
        rep.recomputed_tokens += r.recomputed_tokens as u64;
        rep.restored_tokens += r.restored_tokens as u64;
        rep.turn_records.push(TurnRecord {
            agent,
            turn,
            prompt_tokens: r.usage.prompt_tokens,
            reused_tokens: r.usage.cached_tokens,
            generated_tokens: r.usage.generated_tokens,
        });
        let (done, errors, generated) = (rep.requests, rep.errors, rep.generated_tokens);
        drop(s);
        self.bar.inc(1);
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "{:.1} tok/s, {errors} errors ({done} done)",
            generated as f64 / secs
        ));
    }

    pub(super) fn error(&self) {
        self.lock().report.errors += 1;
        self.bar.inc(1);
    }

    pub(super) fn report(&self, o: &LoadtestOptions, wall: Duration, stats: &Stats) -> RunReport {
        self.bar.finish_and_clear();
        let s = self.lock();
        let mut r = s.report.clone();
        r.agents = o.agents;
        r.turns = o.turns;
        r.grammar = o.grammar;
        r.no_cache_reuse = o.no_cache_reuse;
        r.no_batching = o.no_batching;
        r.wall_s = wall.as_secs_f64();
        r.computed_tokens = r.prompt_tokens - r.reused_tokens;
        r.computed_ratio = if r.prompt_tokens == 0 {
            0.0
        } else {
            r.computed_tokens as f64 / r.prompt_tokens as f64
        };
        r.gen_tok_s = r.generated_tokens as f64 / r.wall_s.max(1e-9);
        r.total_tok_s = (r.generated_tokens + r.prompt_tokens) as f64 / r.wall_s.max(1e-9);
        r.ttft_ms = q(&s.ttft);
        r.ttft_later_ms = q(&s.ttft_later);
        r.itl_ms = q(&s.itl);
        r.turn_ms = q(&s.turn);
        r.queue_ms = q(&s.queue);
        r.batch_mean = stats.mean_batch();
        r.batch_max = stats.max_batch();
        r.steps = stats.steps;
        r.timeline = stats.timeline.clone();
        r.kv_peak_bytes = stats.kv_peak_bytes;
        r.evictions = stats.evictions_requested + stats.preempted;
        r.mask_us = stats.mask_us;
        r.spill = o.spill.is_some();
        r.spills = stats.spills;
        r.spilled_bytes = stats.spilled_bytes;
        r.spill_failures = stats.spill_failures;
        r.restores = stats.restores + stats.restores_in_memory;
        r.restore_failures = stats.restore_failures;
        r.restore_ms = stats.restore_ms;
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
    let ql = |q: &Quantiles| format!("{:>8.0} {:>8.0} {:>8.0}", q.p50, q.p95, q.p99);
    println!(
        "agents {} x turns {} (grammar {:?}{}{})",
        r.agents,
        r.turns,
        r.grammar,
        if r.no_cache_reuse {
            ", no cache reuse"
        } else {
            ""
        },
        if r.no_batching { ", no batching" } else { "" }
    );
    println!(
        "  requests {} ({} errors) in {:.1} s: {:.1} generated tok/s, {:.1} total tok/s",
        r.requests, r.errors, r.wall_s, r.gen_tok_s, r.total_tok_s
    );
    println!("  latency (ms)           p50      p95      p99");
    println!("  ttft              {}", ql(&r.ttft_ms));
    println!("  ttft, later turns {}", ql(&r.ttft_later_ms));
    println!("  inter-token       {}", ql(&r.itl_ms));
    println!("  turn              {}", ql(&r.turn_ms));
    println!("  queue             {}", ql(&r.queue_ms));
    println!("  batch mean {:.1}, max {}", r.batch_mean, r.batch_max);
    println!(
        "  prompt tokens {}: reused {}, computed {} ({:.0}%); generated {}",
        r.prompt_tokens,
        r.reused_tokens,
        r.computed_tokens,
        r.computed_ratio * 100.0,
        r.generated_tokens
    );
    println!(
        "  KV peak {:.1} MiB, evictions {}, recomputed tokens {}, mask p50/p99 {:.0}/{:.0} µs, RSS peak {:.0} MiB",
        r.kv_peak_bytes as f64 / (1 << 20) as f64,
        r.evictions,
        r.recomputed_tokens,
        r.mask_us.p50,
        r.mask_us.p99,
        r.rss_peak_bytes as f64 / (1 << 20) as f64
    );
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
