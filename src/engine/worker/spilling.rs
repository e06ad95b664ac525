//! The engine's side of spilling (see [`EngineConfig::spill`](super::EngineConfig)):
//! starting a parked cache's write, taking the end of a write (the bytes leave the
//! budget only then), reading a spilled cache back for the request that resumes it
//! (off the engine thread: the request waits outside the queue meanwhile), and the
//! fallbacks: a failed write drops the cache and a failed read recomputes it, each
//! with a warning, so a conversation never depends on a spill file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::super::spill::{self, Job, Written};
use super::{AfterSpill, Holder, SeqId, Worker};
use crate::kv::{KvCache, KvDtype};

/// Most recent restore times kept for [`Stats::restore_ms`](super::Stats).
const RESTORE_SAMPLES: usize = 20_000;

/// Where a request's spilled cache is on its way back.
#[derive(Debug)]
pub(super) enum Pending {
    /// Its spill is still being written.
    Write,
    /// In this file, read once the request is admitted (its bytes are accounted
    /// from then on).
    File(PathBuf),
    /// Being read, since then.
    Reading(Instant),
}

/// A request whose cache comes back from a spill file before it runs.
#[derive(Debug)]
pub(super) struct Restore {
    pub pending: Pending,
    /// Tokens of the spilled cache the request continues from (it may hold more:
    /// they are cut).
    pub len: usize,
    /// Those tokens, fed again if the cache cannot be read back; `None` for a
    /// request preempted from the queue, which then fails as preempted (its
    /// requester recomputes).
    pub prefix: Option<Vec<u32>>,
    /// The spilled cache's element type.
    pub dtype: KvDtype,
    /// When the request arrived.
    pub since: Instant,
}

impl Drop for Restore {
    /// A request that goes away (cancelled, failed) before its file was read takes
    /// the file with it.
    fn drop(&mut self) {
        if let Pending::File(path) = &self.pending {
            remove_file(path);
        }
    }
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
    /// is no spill thread (returns false).
    pub(super) fn spill_now(&mut self, lease: super::LeaseId) -> bool {
        let Some(spiller) = self.spill.clone() else {
            self.release(lease);
            return false;
        };
        let Some(Holder::Parked(cache)) = self.holders.remove(&lease) else {
            return false;
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
            return false;
        }
        self.sched.mark_asked(lease.raw());
        self.holders.insert(
            lease,
            Holder::Spilling {
                slot,
                then: AfterSpill::Keep,
            },
        );
        true
    }

    /// Spills the cache of a queued request the scheduler preempts (instead of
    /// dropping it): the request stays queued, and reads its cache back once
    /// admitted. Returns false when it cannot (the caller drops the cache).
    pub(super) fn spill_waiting(&mut self, id: SeqId) -> bool {
        if self.spill.is_none() {
            return false;
        }
        let layout = self.model.config().kv_layout();
        let Some(s) = self.seqs.get_mut(&id) else {
            return false;
        };
        if s.restore.is_some() {
            return false;
        }
        let dtype = s.cache.dtype();
        let needed = s
            .cache
            .bytes()
            .max(KvCache::bytes_per_token(layout, dtype) * s.needed_tokens);
        if s.cache.is_empty() {
            // Room but no tokens (a cache cut back to nothing): its allocation goes,
            // and the request stays queued.
            s.cache.clear();
            self.sched.submit(id, 0, needed);
            return true;
        }
        let cache = std::mem::replace(&mut s.cache, self.model.new_cache(dtype));
        let (len, bytes) = (cache.len(), cache.bytes());
        let lease = super::LeaseId::fresh();
        self.sched.hold(lease.raw(), bytes, true);
        self.holders.insert(lease, Holder::Parked(cache));
        if !self.spill_now(lease) {
            return false;
        }
        if let Some(Holder::Spilling { then, .. }) = self.holders.get_mut(&lease) {
            *then = AfterSpill::Restore(id);
        }
        if let Some(s) = self.seqs.get_mut(&id) {
            s.start_len = 0;
            s.usage.cached_tokens = 0;
            s.restore = Some(Restore {
                pending: Pending::Write,
                len,
                prefix: None,
                dtype,
                since: Instant::now(),
            });
        }
        self.sched.submit(id, 0, needed);
        tracing::debug!(
            request = id,
            tokens = len,
            "preempted: its cache is spilled"
        );
        true
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
                    AfterSpill::Restore(id) => self.restore_from(id, path),
                }
            }
            Written::TakenBack => {
                if let AfterSpill::Restore(id) = then {
                    // Cannot happen (a request that resumes takes the cache itself),
                    // but a request must never wait for nothing.
                    self.restore_failed(id, "its spill was abandoned");
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
                    self.restore_failed(id, "its spill could not be written");
                }
            }
        }
        self.note_kv();
    }

    /// The spill of request `id`'s cache is in `path`: read it now if the request
    /// was admitted, else when it is.
    fn restore_from(&mut self, id: SeqId, path: PathBuf) {
        let Some(r) = self.seqs.get_mut(&id).and_then(|s| s.restore.as_mut()) else {
            // The request went away meanwhile.
            return remove_file(&path);
        };
        r.pending = Pending::File(path);
        self.start_read(id);
    }

    /// Sends the read of an admitted request's spill file.
    pub(super) fn start_read(&mut self, id: SeqId) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let (Some(_), Some(r)) = (s.admitted, s.restore.as_mut()) else {
            return;
        };
        if !matches!(r.pending, Pending::File(_)) {
            return;
        }
        let Pending::File(path) =
            std::mem::replace(&mut r.pending, Pending::Reading(Instant::now()))
        else {
            return;
        };
        let sent = self
            .spill
            .as_ref()
            .is_some_and(|sp| sp.send(Job::Read { id, path }).is_ok());
        if !sent {
            self.restore_failed(id, "the spill thread is gone");
        }
    }

    /// A read back ended: the request goes on from the cache, or recomputes it.
    pub(super) fn restored(&mut self, id: SeqId, cache: std::result::Result<KvCache, String>) {
        let layout = self.model.config().kv_layout();
        let Some(s) = self.seqs.get_mut(&id) else {
            // Cancelled or failed meanwhile.
            return;
        };
        let Some(r) = s.restore.as_ref() else {
            return;
        };
        let checked = cache.and_then(|c| {
            if c.len() < r.len || c.layout() != layout || c.dtype() != r.dtype {
                Err(format!(
                    "it holds {} tokens of {} ({}), the request resumes {} ({})",
                    c.len(),
                    c.layout(),
                    c.dtype(),
                    r.len,
                    r.dtype
                ))
            } else {
                Ok(c)
            }
        });
        let mut c = match checked {
            Ok(c) => c,
            Err(why) => return self.restore_failed(id, &why),
        };
        let took = match r.pending {
            Pending::Reading(at) => at.elapsed(),
            _ => r.since.elapsed(),
        };
        c.truncate(r.len);
        c.reserve_exact(s.needed_tokens);
        s.start_len = c.len();
        s.usage.cached_tokens = c.len();
        s.usage.restored_tokens = c.len();
        s.restored_in = took;
        s.cache = c;
        s.restore = None;
        self.stats.restores += 1;
        self.restore_times.push_back(took.as_secs_f64() * 1e3);
        if self.restore_times.len() > RESTORE_SAMPLES {
            self.restore_times.pop_front();
        }
    }

    /// Request `id`'s spilled cache cannot come back: it feeds the prefix again.
    fn restore_failed(&mut self, id: SeqId, why: &str) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let Some(mut r) = s.restore.take() else {
            return;
        };
        self.stats.restore_failures += 1;
        tracing::warn!(
            request = id,
            "cannot read a spilled cache back ({why}); recomputing its {} tokens",
            r.len
        );
        let Some(prefix) = r.prefix.take() else {
            return self.fail(id, crate::Error::Preempted);
        };
        s.dec.feed.splice(0..0, prefix);
        if s.admitted.is_some() {
            s.cache.reserve_exact(s.needed_tokens);
            let n = s.dec.feed.len();
            self.sched.set_to_feed(id, n);
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
