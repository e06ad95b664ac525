//! `troupe loadtest`: N agent actors in closed loops of multi-turn conversations
//! against one shared model actor, and a report of throughput, latencies, batching,
//! cache reuse, KV memory and grammar cost.

mod options;
mod report;
mod workload;

pub use options::{GrammarKind, LoadtestLimits, LoadtestOptions, LIMITS};
pub use report::{plot, print_table, Quantiles, RunReport, TurnRecord};
pub use workload::run;
