//! `troupe loadtest`: N agent actors in closed loops of multi-turn conversations
//! against one shared model actor, and a report of throughput, latencies, batching,
//! cache reuse, KV memory and grammar cost.

mod report;
mod workload;

pub use crate::stats::Quantiles;
pub use report::{plot, print_table, RunReport};
pub use workload::{run, GrammarKind, LoadtestLimits, LoadtestOptions, LIMITS};
