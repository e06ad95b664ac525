//! `GET /metrics`: the engine's counters and the server's, in Prometheus' text
//! format (the `prometheus` crate's encoder), read fresh at each scrape.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use super::errors::ApiError;
use super::State;

fn gauge(r: &Registry, name: &str, help: &str, v: u64) -> prometheus::Result<()> {
    let g = IntGauge::new(name, help)?;
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    r.register(Box::new(g))
}

fn render(st: &State, stats: &crate::engine::Stats) -> prometheus::Result<String> {
    let r = Registry::new_custom(Some("troupe".into()), None)?;
    let k = &st.counters;
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let rows: [(&str, &str, u64); 29] = [
        (
            "running",
            "sequences in the running batch",
            stats.running as u64,
        ),
        (
            "waiting",
            "sequences waiting for admission",
            stats.waiting as u64,
        ),
        ("steps_total", "forward steps run", stats.steps),
        (
            "max_step_tokens",
            "largest token count of one step",
            stats.max_step_tokens as u64,
        ),
        (
            "tokens_computed_total",
            "tokens run through the model",
            stats.tokens_computed,
        ),
        (
            "tokens_generated_total",
            "tokens generated",
            stats.tokens_generated,
        ),
        (
            "tokens_reused_total",
            "prompt tokens served from sessions' caches",
            c(&k.cached_tokens),
        ),
        (
            "prompt_tokens_total",
            "prompt tokens of completed requests",
            c(&k.prompt_tokens),
        ),
        (
            "completion_tokens_total",
            "tokens generated for completed requests",
            c(&k.completion_tokens),
        ),
        (
            "tokens_recomputed_total",
            "tokens computed again after an eviction or a changed transcript",
            c(&k.recomputed_tokens),
        ),
        (
            "kv_live_bytes",
            "bytes of live KV caches",
            stats.kv_live_bytes as u64,
        ),
        (
            "kv_peak_bytes",
            "most bytes of live KV caches",
            stats.kv_peak_bytes as u64,
        ),
        ("kv_budget_bytes", "KV budget", stats.kv_budget_bytes as u64),
        (
            "evictions_total",
            "caches the engine asked their holders to evict",
            stats.evictions_requested,
        ),
        (
            "preempted_total",
            "queued requests whose cache was dropped",
            stats.preempted,
        ),
        (
            "engine_cancelled_total",
            "generations cancelled (their reader went away)",
            stats.cancelled,
        ),
        (
            "engine_finished_total",
            "generations finished",
            stats.finished,
        ),
        (
            "engine_restarts_total",
            "engine threads restarted after a panic",
            stats.engine_restarts,
        ),
        (
            "spills_total",
            "caches written to the spill folder",
            stats.spills,
        ),
        (
            "spilled_bytes_total",
            "bytes written to the spill folder",
            stats.spilled_bytes,
        ),
        (
            "spill_failures_total",
            "spill writes that failed (the cache was dropped)",
            stats.spill_failures,
        ),
        (
            "restores_total",
            "spilled caches read back instead of recomputed",
            stats.restores,
        ),
        (
            "restore_failures_total",
            "spilled caches that could not be read back (recomputed)",
            stats.restore_failures,
        ),
        (
            "spill_files",
            "files in the spill folder now",
            stats.spill_files as u64,
        ),
        (
            "spill_bytes",
            "bytes in the spill folder now",
            stats.spill_bytes,
        ),
        ("sessions", "live sessions", st.sessions.len() as u64),
        ("requests_total", "chat completion requests", c(&k.requests)),
        (
            "requests_failed_total",
            "chat completion requests answered with an error",
            c(&k.failed),
        ),
        (
            "requests_cancelled_total",
            "chat completions whose client went away",
            c(&k.cancelled),
        ),
    ];
    for (name, help, v) in rows {
        gauge(&r, name, help, v)?;
    }
    let batches = IntGaugeVec::new(
        Opts::new(
            "batch_steps",
            "forward steps by the number of sequences they carried",
        ),
        &["size"],
    )?;
    for (size, &n) in stats.batch_sizes.iter().enumerate().filter(|(_, &n)| n > 0) {
        batches
            .with_label_values(&[&size.to_string()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(Box::new(batches))?;
    gauge(
        &r,
        "queue_ms_p50",
        "median wait for admission, ms",
        stats.queue_ms.p50.round() as u64,
    )?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The handler.
pub(super) async fn metrics(st: AxState<Arc<State>>) -> Response {
    let stats = match st.engine.stats().await {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match render(&st, &stats) {
        Ok(text) => ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::from(crate::Error::Report {
            what: format!("metrics: {e}"),
        })
        .into_response(),
    }
}
