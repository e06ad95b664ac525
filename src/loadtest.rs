//! `troupe loadtest`: N agents in multi-turn conversations, closed-loop or
//! open-loop, against one shared model actor in process, or over HTTP against any
//! OpenAI-compatible server; and a report of throughput, latencies (under the names
//! serving benchmarks use), batching, cache reuse, KV memory and grammar cost.

mod arrivals;
mod http;
mod options;
mod report;
mod serving;
mod sse;
mod workload;

pub use crate::stats::Quantiles;
pub use http::{run_url, HttpTarget};
pub use options::{Goodput, GrammarKind, LoadtestLimits, LoadtestOptions, LIMITS};
pub use report::{plot, print_table, RunReport, TurnRecord};
pub use serving::{Dist, ServingMetrics, TTFT_BY_TURN_MAX};
pub use sse::{SseParser, Streamed, StreamedCall};
pub use workload::run;
