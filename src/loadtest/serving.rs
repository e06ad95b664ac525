//! The figures serving benchmarks report, under their names: request, output and
//! total token throughput, goodput, and the mean, median, p90, p95 and p99 of time to
//! first token (TTFT), time per output token after the first (TPOT), inter-token
//! latency (ITL) and end-to-end latency (E2EL) per request, with TTFT by turn index.
//! In-process a request is an agent's turn; over HTTP it is one completion request.
//!
//! TPOT is `(e2el - ttft) / (output tokens - 1)` of each request with more than one
//! output token (a one-token request counts 0 for goodput, as serving benchmarks
//! count it); ITL is the time between successive streamed chunks of text.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::ser::SerializeMap;

use super::options::Goodput;
use crate::stats::Quantiles;

/// Turn indices whose TTFT is reported apart (later turns are not).
pub const TTFT_BY_TURN_MAX: usize = 64;

/// What one request measured.
#[derive(Clone, Debug)]
pub(super) struct RequestSample {
    /// When it was sent.
    pub sent: Instant,
    /// When each chunk of generated text arrived.
    pub token_times: Vec<Instant>,
    /// When its last byte arrived.
    pub end: Instant,
    /// Tokens of its prompt.
    pub prompt_tokens: usize,
    /// Of those, tokens the server reused from a cache, where it says.
    pub cached_tokens: Option<usize>,
    /// Tokens generated.
    pub generated_tokens: usize,
}

/// A distribution's figures: [`Quantiles`] and the standard deviation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dist {
    /// Mean, median and percentiles.
    pub q: Quantiles,
    /// Standard deviation.
    pub std: f64,
}

/// The serving-benchmark figures of one run. Serialized flat under the names of
/// vLLM's and SGLang's `benchmark_serving` results (`request_throughput`,
/// `mean_ttft_ms`, `p99_itl_ms`, ...), so the two JSON reports diff key by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServingMetrics {
    /// Wall time of the run, s.
    pub duration: f64,
    /// Completed requests.
    pub completed: u64,
    /// Failed requests.
    pub failed: u64,
    /// Prompt tokens of the completed requests.
    pub total_input_tokens: u64,
    /// Generated tokens of the completed requests.
    pub total_output_tokens: u64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Requests per second meeting every objective of `--goodput` (when given).
    pub request_goodput: Option<f64>,
    /// Generated tokens per second.
    pub output_throughput: f64,
    /// Prompt plus generated tokens per second.
    pub total_token_throughput: f64,
    /// Time to first token, ms.
    pub ttft_ms: Dist,
    /// Time per output token after the first, ms.
    pub tpot_ms: Dist,
    /// Time between streamed chunks, ms.
    pub itl_ms: Dist,
    /// End-to-end latency, ms.
    pub e2el_ms: Dist,
}

impl serde::Serialize for ServingMetrics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("duration", &self.duration)?;
        m.serialize_entry("completed", &self.completed)?;
        m.serialize_entry("failed", &self.failed)?;
        m.serialize_entry("total_input_tokens", &self.total_input_tokens)?;
        m.serialize_entry("total_output_tokens", &self.total_output_tokens)?;
        m.serialize_entry("request_throughput", &self.request_throughput)?;
        m.serialize_entry("request_goodput", &self.request_goodput)?;
        m.serialize_entry("output_throughput", &self.output_throughput)?;
        m.serialize_entry("total_token_throughput", &self.total_token_throughput)?;
        for (name, d) in [
            ("ttft", &self.ttft_ms),
            ("tpot", &self.tpot_ms),
            ("itl", &self.itl_ms),
            ("e2el", &self.e2el_ms),
        ] {
            for (stat, v) in [
                ("mean", d.q.mean),
                ("median", d.q.p50),
                ("std", d.std),
                ("p90", d.q.p90),
                ("p95", d.q.p95),
                ("p99", d.q.p99),
            ] {
                m.serialize_entry(&format!("{stat}_{name}_ms"), &v)?;
            }
        }
        m.end()
    }
}

fn hist() -> Histogram<u64> {
    // Microseconds up to an hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 3_600_000_000)
}

/// The figures of a histogram of microseconds, in ms.
pub(super) fn dist(h: &Histogram<u64>) -> Dist {
    if h.is_empty() {
        return Dist::default();
    }
    let at = |p: f64| h.value_at_quantile(p) as f64 / 1e3;
    Dist {
        q: Quantiles {
            mean: h.mean() / 1e3,
            p50: at(0.50),
            p90: at(0.90),
            p95: at(0.95),
            p99: at(0.99),
        },
        std: h.stdev() / 1e3,
    }
}

/// The samples behind [`ServingMetrics`], gathered while a run goes.
pub(super) struct ServingSamples {
    ttft: Histogram<u64>,
    tpot: Histogram<u64>,
    itl: Histogram<u64>,
    e2el: Histogram<u64>,
    ttft_by_turn: Vec<Histogram<u64>>,
    completed: u64,
    failed: u64,
    good: u64,
    input_tokens: u64,
    output_tokens: u64,
    goodput: Option<Goodput>,
}

impl ServingSamples {
    pub(super) fn new(turns: usize, goodput: Option<Goodput>) -> Self {
        Self {
            ttft: hist(),
            tpot: hist(),
            itl: hist(),
            e2el: hist(),
            ttft_by_turn: (0..turns.min(TTFT_BY_TURN_MAX)).map(|_| hist()).collect(),
            completed: 0,
            failed: 0,
            good: 0,
            input_tokens: 0,
            output_tokens: 0,
            goodput,
        }
    }

    /// Records a completed request of turn `turn`; returns its TTFT.
    pub(super) fn add(&mut self, turn: usize, r: &RequestSample) -> Duration {
        let e2el = r.end.saturating_duration_since(r.sent);
        let ttft = r
            .token_times
            .first()
            .map_or(e2el, |t| t.saturating_duration_since(r.sent));
        let _ = self.ttft.record(us(ttft));
        if let Some(h) = self.ttft_by_turn.get_mut(turn) {
            let _ = h.record(us(ttft));
        }
        let _ = self.e2el.record(us(e2el));
        for w in r.token_times.windows(2) {
            let _ = self.itl.record(us(w[1].saturating_duration_since(w[0])));
        }
        let tpot = if r.generated_tokens > 1 {
            let t = e2el.saturating_sub(ttft) / (r.generated_tokens as u32 - 1).max(1);
            let _ = self.tpot.record(us(t));
            t
        } else {
            Duration::ZERO
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if self
            .goodput
            .is_some_and(|g| g.met(ms(ttft), ms(tpot), ms(e2el)))
        {
            self.good += 1;
        }
        self.completed += 1;
        self.input_tokens += r.prompt_tokens as u64;
        self.output_tokens += r.generated_tokens as u64;
        ttft
    }

    /// Records a failed request.
    pub(super) fn fail(&mut self) {
        self.failed += 1;
    }

    /// TTFT of each turn index (up to [`TTFT_BY_TURN_MAX`]).
    pub(super) fn ttft_by_turn(&self) -> Vec<Quantiles> {
        self.ttft_by_turn.iter().map(|h| dist(h).q).collect()
    }

    /// The figures over a run of `wall`.
    pub(super) fn metrics(&self, wall: Duration) -> ServingMetrics {
        let secs = wall.as_secs_f64().max(1e-9);
        ServingMetrics {
            duration: wall.as_secs_f64(),
            completed: self.completed,
            failed: self.failed,
            total_input_tokens: self.input_tokens,
            total_output_tokens: self.output_tokens,
            request_throughput: self.completed as f64 / secs,
            request_goodput: self.goodput.map(|_| self.good as f64 / secs),
            output_throughput: self.output_tokens as f64 / secs,
            total_token_throughput: (self.input_tokens + self.output_tokens) as f64 / secs,
            ttft_ms: dist(&self.ttft),
            tpot_ms: dist(&self.tpot),
            itl_ms: dist(&self.itl),
            e2el_ms: dist(&self.e2el),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t0: Instant, first_ms: u64, gaps_ms: &[u64], generated: usize) -> RequestSample {
        let mut at = t0 + Duration::from_millis(first_ms);
        let mut token_times = vec![at];
        for g in gaps_ms {
            at += Duration::from_millis(*g);
            token_times.push(at);
        }
        RequestSample {
            sent: t0,
            token_times,
            end: at,
            prompt_tokens: 10,
            cached_tokens: Some(4),
            generated_tokens: generated,
        }
    }

    #[test]
    fn figures_of_known_requests() {
        let goodput = Goodput::parse(&["ttft:150", "tpot:15"]).unwrap();
        let mut s = ServingSamples::new(2, Some(goodput));
        let t0 = Instant::now();
        // TTFT 100 ms, then 20 ms for 2 more tokens: TPOT 10 ms; meets both.
        s.add(0, &sample(t0, 100, &[10, 10], 3));
        // One token: no TPOT sample, and TPOT 0 for goodput; TTFT 200 misses.
        s.add(1, &sample(t0, 200, &[], 1));
        // TTFT 50, TPOT 30: misses the TPOT objective.
        s.add(1, &sample(t0, 50, &[30], 2));
        s.fail();
        let m = s.metrics(Duration::from_secs(2));
        assert_eq!((m.completed, m.failed), (3, 1));
        assert_eq!((m.total_input_tokens, m.total_output_tokens), (30, 6));
        assert_eq!(m.request_throughput, 1.5);
        assert_eq!(m.request_goodput, Some(0.5));
        assert_eq!(m.output_throughput, 3.0);
        assert_eq!(m.total_token_throughput, 18.0);
        let near = |a: f64, b: f64| (a - b).abs() < 0.5;
        assert!(near(m.ttft_ms.q.mean, 350.0 / 3.0), "{:?}", m.ttft_ms);
        assert!(near(m.tpot_ms.q.mean, 20.0) && near(m.tpot_ms.q.p99, 30.0));
        assert!(near(m.itl_ms.q.p50, 10.0) && near(m.itl_ms.q.p99, 30.0));
        assert!(near(m.e2el_ms.q.p99, 200.0));
        let by_turn = s.ttft_by_turn();
        assert!(near(by_turn[0].p50, 100.0) && near(by_turn[1].mean, 125.0));

        let json = serde_json::to_value(&m).unwrap();
        for key in [
            "request_goodput",
            "median_tpot_ms",
            "std_itl_ms",
            "p90_e2el_ms",
        ] {
            assert!(json[key].is_number(), "{key}");
        }
    }

    #[test]
    fn goodput_objectives_parse_and_name_bad_ones() {
        let g = Goodput::parse(&["ttft:500", "e2el:2000"]).unwrap();
        assert_eq!(
            (g.ttft_ms, g.tpot_ms, g.e2el_ms),
            (Some(500.0), None, Some(2000.0))
        );
        assert!(g.met(500.0, 1e9, 2000.0) && !g.met(501.0, 0.0, 0.0));
        for (bad, says) in [
            (&["ttft"][..], "KEY:MS"),
            (&["itl:5"][..], "unknown objective"),
            (&["tpot:-1"][..], "not a number"),
            (&[][..], "no objective"),
        ] {
            let e = Goodput::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--goodput") && e.contains(says), "{bad:?}: {e}");
        }
    }
}
