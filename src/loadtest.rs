//! `troupe loadtest`: N agent actors in closed loops of multi-turn conversations
//! against one shared model actor, and a report of throughput, latencies, batching,
//! cache reuse, KV memory and grammar cost.

mod options;
mod report;
mod workload;

pub use crate::stats::Quantiles;
pub use options::{GrammarKind, LoadtestLimits, LoadtestOptions, LIMITS};
pub use report::{plot, print_table, RunReport, TurnRecord};
pub use workload::run;
