//! The engine's side of spilling (see [`EngineConfig::spill`](super::EngineConfig)):
//! starting a parked cache's write, taking the end of a write (the bytes leave the
//! budget only then), reading a spilled cache back for the request that resumes it
//! (off the engine thread: the request waits outside the queue meanwhile), and the
//! fallbacks: a failed write drops the cache and a failed read recomputes it, each
//! with a warning, so a conversation never depends on a spill file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::super::spill::{self, Job, Written};
use super::super::Event;
use super::{AfterSpill, Holder, SeqId, Submission, Worker};
use crate::kv::{KvCache, KvDtype};
use crate::Error;

/// Most recent restore times kept for [`Stats::restore_ms`](super::Stats).
const RESTORE_SAMPLES: usize = 20_000;

/// A request whose cache is on its way back from a spill file.
pub(super) struct Restoring {
    pub sub: Submission,
    /// Its new tokens.
    pub feed: Vec<u32>,
    /// The tokens the spilled cache held (fed again if it cannot be read back).
    pub prefix: Vec<u32>,
    /// The spilled cache's element type.
    pub dtype: KvDtype,
    /// When the request arrived.
    pub since: Instant,
}

/// Removes a spill file (already gone is fine).
pub(super) fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), "cannot remove a spill file: {e}");
        }
    }
}

impl Worker {
    /// Starts writing the parked cache of `lease` to the spill folder; its bytes stay
    /// accounted (as asked to evict) until the write ends. Dropped at once when there
    /// is no spill thread.
    pub(super) fn spill_now(&mut self, lease: super::LeaseId) {
        let Some(spiller) = self.spill.clone() else {
            self.release(lease);
            return;
        };
        let Some(Holder::Parked(cache)) = self.holders.remove(&lease) else {
            return;
        };
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(cache)));
        let job = Job::Write {
            lease,
            path: spiller.path(lease),
            slot: slot.clone(),
        };
        if spiller.send(job).is_err() {
            tracing::warn!("the spill thread is gone; a parked cache is dropped");
            self.release(lease);
            return;
        }
        self.sched.mark_asked(lease.raw());
        self.holders.insert(
            lease,
            Holder::Spilling {
                slot,
                then: AfterSpill::Keep,
            },
        );
    }

    /// The end of a spill write.
    pub(super) fn spilled(&mut self, lease: super::LeaseId, path: PathBuf, outcome: Written) {
        let then = match self.holders.get(&lease) {
            Some(Holder::Spilling { then, .. }) => *then,
            // Not ours any more (an engine restart forgot it): nothing may keep it.
            _ => {
                if let Written::Done(_) = outcome {
                    remove_file(&path);
                }
                return;
            }
        };
        self.holders.remove(&lease);
        self.sched.release(lease.raw());
        match outcome {
            Written::Done(bytes) => {
                self.stats.spills += 1;
                self.stats.spilled_bytes += bytes;
                match then {
                    AfterSpill::Keep => {
                        self.holders.insert(lease, Holder::Spilled { path, bytes });
                    }
                    AfterSpill::Remove => remove_file(&path),
                    AfterSpill::Restore(id) => match self.restoring.remove(&id) {
                        Some(r) => self.read_back(r, path),
                        None => remove_file(&path),
                    },
                }
            }
            Written::TakenBack => {
                if let AfterSpill::Restore(id) = then {
                    // Cannot happen (a request that resumes takes the cache itself),
                    // but a request must never wait for nothing.
                    if let Some(r) = self.restoring.remove(&id) {
                        self.recompute(r);
                    }
                }
            }
            Written::Failed(why) => {
                self.stats.spill_failures += 1;
                tracing::warn!(
                    path = %path.display(),
                    failures = self.stats.spill_failures,
                    "cannot spill a cache ({why}); it is dropped and will be recomputed"
                );
                if let AfterSpill::Restore(id) = then {
                    if let Some(r) = self.restoring.remove(&id) {
                        self.recompute(r);
                    }
                }
            }
        }
        self.note_kv();
    }

    /// Sends the read of `path` for the request in `r`, which waits for it outside
    /// the queue.
    pub(super) fn read_back(&mut self, r: Restoring, path: PathBuf) {
        let id = r.sub.id;
        let Some(spiller) = self.spill.clone() else {
            remove_file(&path);
            return self.recompute(r);
        };
        if spiller.send(Job::Read { id, path }).is_err() {
            return self.recompute(r);
        }
        self.restoring.insert(id, r);
    }

    /// A read back ended: the request goes on from the cache, or recomputes it.
    pub(super) fn restored(&mut self, id: SeqId, cache: std::result::Result<KvCache, String>) {
        let Some(r) = self.restoring.remove(&id) else {
            // Cancelled or failed meanwhile.
            return;
        };
        let layout = self.model.config().kv_layout();
        let cache = cache.and_then(|c| {
            if c.len() != r.prefix.len() || c.layout() != layout || c.dtype() != r.dtype {
                Err(format!(
                    "it holds {} tokens of {} ({}), the request's park held {} ({})",
                    c.len(),
                    c.layout(),
                    c.dtype(),
                    r.prefix.len(),
                    r.dtype
                ))
            } else {
                Ok(c)
            }
        });
        match cache {
            Ok(c) => {
                let took = r.since.elapsed();
                self.stats.restores += 1;
                self.restore_times.push_back(took.as_secs_f64() * 1e3);
                if self.restore_times.len() > RESTORE_SAMPLES {
                    self.restore_times.pop_front();
                }
                self.enqueue(r.sub, c, r.feed, Some(took));
            }
            Err(why) => {
                self.stats.restore_failures += 1;
                tracing::warn!("cannot read a spilled cache back ({why}); recomputing it");
                self.recompute(r);
            }
        }
    }

    /// Queues the request of `r` from an empty cache, its prefix fed again.
    pub(super) fn recompute(&mut self, r: Restoring) {
        let Restoring {
            sub,
            mut feed,
            prefix,
            dtype,
            ..
        } = r;
        feed.splice(0..0, prefix);
        let cache = self.model.new_cache(dtype);
        self.enqueue(sub, cache, feed, None);
    }

    /// Forgets the restores whose requester went away.
    pub(super) fn drop_cancelled_restores(&mut self) {
        let before = self.restoring.len();
        self.restoring.retain(|_, r| !r.sub.tx.is_closed());
        self.stats.cancelled += (before - self.restoring.len()) as u64;
    }

    /// Fails every request waiting for a restore (an empty cache handed back: the
    /// requester recomputes).
    pub(super) fn fail_restores(&mut self, error: &impl Fn() -> Error) {
        for (_, r) in self.restoring.drain() {
            let cache = self.model.new_cache(r.dtype);
            let _ = r.sub.tx.send(Event::Failed {
                error: error(),
                cache: Box::new(cache.into()),
            });
        }
    }

    /// Removes the files of every spilled cache and empties the slots of those being
    /// written (whose writers then remove theirs): this engine is ending, and no
    /// lease of it will be resumed.
    pub(super) fn forget_spills(&mut self) {
        for (_, h) in self.holders.iter_mut() {
            match h {
                Holder::Spilled { path, .. } => remove_file(path),
                Holder::Spilling { slot, then } => {
                    drop(spill::lock(slot).take());
                    *then = AfterSpill::Remove;
                }
                _ => {}
            }
        }
        self.holders
            .retain(|_, h| !matches!(h, Holder::Spilled { .. }));
    }

    /// Spill files on disk now, and their bytes.
    pub(super) fn spill_files(&self) -> (usize, u64) {
        self.holders
            .values()
            .filter_map(|h| match h {
                Holder::Spilled { bytes, .. } => Some(*bytes),
                _ => None,
            })
            .fold((0, 0), |(n, b), x| (n + 1, b + x))
    }
}
