//! Where the forward's time goes: per-phase wall time of the steps run while
//! profiling is on (`troupe bench forward --profile`).
//!
//! Off by default; when off, a step reads one atomic flag and takes no clock
//! readings. The counters are process-wide, which suits a bench that runs one
//! forward at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A part of the forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The products of the blocks' linear layers (QKV, output, gate/up, down).
    Linear,
    /// Attention of each sequence against its cache.
    Attention,
    /// Embedding, norms, rotary, activation, residuals, cache writes and copies.
    Other,
    /// The final norm and the output head.
    Head,
}

const PHASES: usize = 4;
static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; PHASES] = [const { AtomicU64::new(0) }; PHASES];

/// Seconds spent per phase since the last [`take`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PhaseTimes {
    /// See [`Phase::Linear`].
    pub linear: f64,
    /// See [`Phase::Attention`].
    pub attention: f64,
    /// See [`Phase::Other`].
    pub other: f64,
    /// See [`Phase::Head`].
    pub head: f64,
}

/// Turns profiling on or off (and clears the counters).
pub fn enable(on: bool) {
    take();
    ON.store(on, Ordering::Relaxed);
}

/// The counters, cleared.
pub fn take() -> PhaseTimes {
    let s = |p: Phase| NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9;
    PhaseTimes {
        linear: s(Phase::Linear),
        attention: s(Phase::Attention),
        other: s(Phase::Other),
        head: s(Phase::Head),
    }
}

/// A stopwatch through the phases of one forward.
pub(crate) struct Lap(Option<Instant>);

impl Lap {
    /// Starts timing if profiling is on.
    pub(crate) fn start() -> Self {
        Self(ON.load(Ordering::Relaxed).then(Instant::now))
    }

    /// Charges the time since the last lap to `phase`.
    #[inline]
    pub(crate) fn lap(&mut self, phase: Phase) {
        if let Some(t) = &mut self.0 {
            let now = Instant::now();
            NANOS[phase as usize].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
            *t = now;
        }
    }
}
