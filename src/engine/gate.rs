//! A gate the tests put in front of the engine's steps, so that a test controls when
//! the engine steps instead of sleeping and hoping (the engine thread does not run on
//! tokio's clock, so `tokio::time::pause()` cannot hold it).
//!
//! Open, it lets every step through. Held, the engine waits before its next step
//! until the test [`allow`](StepGate::allow)s more steps or [`open`](StepGate::open)s
//! it; [`wait_blocked`](StepGate::wait_blocked) tells the test the engine is waiting
//! there. While it waits, the engine still takes commands every millisecond (a test
//! can read the stats, drop a stream and see it cancelled, or submit a request), so
//! a held gate pauses the forward, not the engine.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
struct State {
    held: bool,
    /// Steps allowed through while held.
    permits: u64,
    /// The engine is waiting at the gate.
    blocked: bool,
    /// Steps that went through.
    passed: u64,
}

/// Holds and releases the engine's steps (see the module docs). Cheap to clone; the
/// clones are one gate.
#[derive(Clone, Debug, Default)]
pub struct StepGate {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl StepGate {
    /// A gate that holds every step until allowed.
    pub fn held() -> Self {
        let g = Self::default();
        g.lock().held = true;
        g
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the steps after the one running now.
    pub fn hold(&self) {
        self.lock().held = true;
    }

    /// Lets `n` more steps through while held.
    pub fn allow(&self, n: u64) {
        self.lock().permits += n;
        self.inner.1.notify_all();
    }

    /// Lets every step through from now on.
    pub fn open(&self) {
        self.lock().held = false;
        self.inner.1.notify_all();
    }

    /// Steps that went through the gate so far.
    pub fn passed(&self) -> u64 {
        self.lock().passed
    }

    /// Waits (on a blocking thread) until the engine waits at the gate with no
    /// permit left, or `timeout` passes; returns whether it does.
    pub fn wait_blocked(&self, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .inner
            .1
            .wait_timeout_while(guard, timeout, |s| !(s.blocked && s.permits == 0))
            .unwrap_or_else(|p| p.into_inner());
        guard.blocked && guard.permits == 0
    }

    /// Called by the engine before each step: whether the step may run now (taking a
    /// permit when held). When it may not, the engine is marked as waiting here, and
    /// goes on taking commands (stats, cancellations, new requests) until it may.
    pub(crate) fn try_pass(&self) -> bool {
        let mut s = self.lock();
        if s.held && s.permits == 0 {
            s.blocked = true;
            self.inner.1.notify_all();
            return false;
        }
        s.blocked = false;
        if s.held {
            s.permits -= 1;
        }
        s.passed += 1;
        self.inner.1.notify_all();
        true
    }

    /// Waits until a step may pass or `timeout` ends (the engine then looks at its
    /// commands again).
    pub(crate) fn wait_open(&self, timeout: Duration) {
        let guard = self.lock();
        let _ = self
            .inner
            .1
            .wait_timeout_while(guard, timeout, |s| s.held && s.permits == 0);
    }
}
