//! When a load test's requests may start: in the closed loop an agent sends its next
//! turn as soon as its last one is over; in the open loop (`--request-rate R`)
//! requests arrive as a Poisson process of rate R (exponential gaps, seeded), each
//! taken by an agent that is free, in the order they wait; and `--max-concurrency C`
//! caps the requests in flight in either loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};

use super::options::LoadtestOptions;

/// Admits the workload's turns (shared by the agents' tasks).
pub(super) struct Arrivals {
    /// Arrival times, produced at the Poisson rate (open loop only).
    arrived: Option<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    slots: Option<Arc<Semaphore>>,
    producer: Option<tokio::task::JoinHandle<()>>,
}

/// A turn allowed to start: holds its slot under `--max-concurrency` until dropped.
pub(super) struct Admitted {
    /// When it arrived (open loop) or asked to start (closed loop).
    pub arrived: Instant,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Arrivals {
    /// The arrivals of `o`'s run (in the open loop, `agents x turns` of them).
    pub(super) fn new(o: &LoadtestOptions) -> Self {
        let (arrived, producer) = match o.request_rate {
            None => (None, None),
            Some(rate) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let total = o.agents.saturating_mul(o.turns);
                let mut rng = StdRng::seed_from_u64(o.seed ^ 0xA11_1BA1);
                let producer = tokio::spawn(async move {
                    let mut next = tokio::time::Instant::now();
                    for _ in 0..total {
                        if tx.send(Instant::now()).is_err() {
                            return;
                        }
                        let u: f64 = rng.random_range(f64::EPSILON..1.0);
                        let gap = (-u.ln() / rate).min(86_400.0);
                        next += Duration::from_secs_f64(gap);
                        tokio::time::sleep_until(next).await;
                    }
                });
                (Some(Mutex::new(rx)), Some(producer))
            }
        };
        Self {
            arrived,
            slots: o.max_concurrency.map(|c| Arc::new(Semaphore::new(c))),
            producer,
        }
    }

    /// Waits for the next arrival (open loop) and a free slot (`--max-concurrency`);
    /// `None` when no arrival is left.
    pub(super) async fn admit(&self) -> Option<Admitted> {
        let arrived = match &self.arrived {
            Some(rx) => rx.lock().await.recv().await?,
            None => Instant::now(),
        };
        let slot = match &self.slots {
            Some(s) => Some(s.clone().acquire_owned().await.ok()?),
            None => None,
        };
        Some(Admitted {
            arrived,
            _slot: slot,
        })
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        if let Some(p) = &self.producer {
            p.abort();
        }
    }
}
