//! The engine's side of the cache lease: accounting idle caches held outside the
//! engine, parking caches here, handing caches back leased, asking holders to evict,
//! and taking a request's cache (leased or parked) into the engine.

use super::super::lease::{Evict, Lease, LeaseId, LeasedCache};
use super::super::Usage;
use super::{AfterSpill, Holder, Seq, Submission, Worker};
use crate::kv::KvCache;
use kameo::actor::WeakRecipient;

impl Worker {
    /// Accounts an idle cache of `bytes` under `lease`. A parked one is evicted after
    /// the idle caches of holders between turns (it is about to be used again), but
    /// without waiting for anyone.
    pub(super) fn hold(&mut self, lease: LeaseId, bytes: usize, holder: Holder) {
        let parked = matches!(holder, Holder::Parked(_));
        self.sched.hold(lease.raw(), bytes, parked);
        self.holders.insert(lease, holder);
        self.note_kv();
    }

    /// A lease ended: its bytes are no longer counted (a parked cache is dropped, a
    /// spilled one's file removed, and a spill being written is removed when it ends).
    pub(super) fn release(&mut self, lease: LeaseId) {
        self.sched.release(lease.raw());
        match self.holders.remove(&lease) {
            Some(Holder::Spilled { path, .. }) => super::spilling::remove_file(&path),
            Some(Holder::Spilling { slot, .. }) => {
                // Out of memory now; the writer removes its file when it finds the
                // slot empty, or the end of the write does.
                drop(super::super::spill::lock(&slot).take());
                self.holders.insert(
                    lease,
                    Holder::Spilling {
                        slot,
                        then: AfterSpill::Remove,
                    },
                );
            }
            _ => {}
        }
        self.note_kv();
    }

    /// A cache leaving the engine: leased to `holder` when there is one (still
    /// accounted, now evictable), plain otherwise.
    pub(super) fn hand_back(
        &mut self,
        cache: KvCache,
        holder: Option<WeakRecipient<Evict>>,
    ) -> LeasedCache {
        let Some(holder) = holder else {
            return cache.into();
        };
        if cache.bytes() == 0 {
            return cache.into();
        }
        let lease = LeaseId::fresh();
        self.hold(lease, cache.bytes(), Holder::Remote(holder));
        LeasedCache::leased(cache, Lease::new(lease, self.me.clone()))
    }

    /// Asks the holders of `leases` to drop their caches: a parked cache goes at once
    /// (or starts its spill, whose end frees the bytes); a remote holder gets an
    /// [`Evict`] naming the lease (its drop of the lease, or its spill, releases the
    /// bytes). Returns whether any bytes were freed already.
    pub(super) fn evict(&mut self, leases: &[u64]) -> bool {
        let mut freed = false;
        for &raw in leases {
            let lease = LeaseId::from_raw(raw);
            match self.holders.get(&lease) {
                Some(Holder::Parked(_)) => {
                    self.stats.evictions_requested += 1;
                    if self.spill.is_some() {
                        tracing::debug!(lease = raw, "spilling a parked cache");
                        self.spill_now(lease);
                    } else {
                        tracing::debug!(lease = raw, "dropped a parked cache");
                        self.release(lease);
                        freed = true;
                    }
                }
                Some(Holder::Remote(r)) => {
                    tracing::debug!(lease = raw, "asked to evict its idle cache");
                    self.stats.evictions_requested += 1;
                    let Some(r) = r.upgrade() else {
                        // The holder is gone: its lease's release is on its way.
                        continue;
                    };
                    let msg = Evict { lease: Some(lease) };
                    match &self.runtime {
                        // From a task, which waits for room in a full mailbox
                        // rather than dropping the request.
                        Some(rt) => {
                            rt.spawn(async move {
                                let _ = r.tell(msg).send().await;
                            });
                        }
                        None => {
                            if r.tell(msg).try_send().is_err() {
                                tracing::warn!(lease = raw, "could not deliver an eviction");
                            }
                        }
                    }
                }
                Some(Holder::Spilling { .. } | Holder::Spilled { .. }) | None => {}
            }
        }
        freed
    }

    /// Takes a checked request in: its cache (a lease on it ends here, the request
    /// accounts for it now; a parked one is taken back, read back from its spill
    /// file first, or recomputed from the request's prefix when it was dropped),
    /// queued for admission.
    pub(super) fn submit(&mut self, mut s: Submission) {
        if self
            .hooks
            .exit_engine_on_token
            .is_some_and(|t| s.request.tokens.contains(&t))
        {
            // The submission is dropped with its stream's sender, as in a dead thread.
            self.exit = true;
            return;
        }
        if let Some(t) = self.hooks.crash_engine_on_token {
            if s.request.tokens.contains(&t) {
                // Outside every `catch_unwind`: the engine thread dies.
                panic!("test hook: the engine thread crashes on token {t}");
            }
        }
        let dtype = s.request.cache.dtype();
        let given = std::mem::replace(&mut s.request.cache, self.model.new_cache(dtype).into());
        let (cache, lease) = given.into_parts();
        if let Some(lease) = lease {
            self.release(lease.disarm());
        }
        let feed = std::mem::take(&mut s.request.tokens);
        let Some(resume) = s.request.resume.take() else {
            return self.enqueue(s, cache, feed);
        };
        let keep = resume.parked.len;
        let (dtype, lease) = (resume.parked.dtype, resume.parked.lease.disarm());
        self.sched.release(lease.raw());
        let (prefix, mut feed) = (resume.prefix, feed);
        let pending = match self.holders.remove(&lease) {
            Some(Holder::Parked(mut parked)) => {
                parked.truncate(keep);
                return self.enqueue(s, parked, feed);
            }
            Some(Holder::Spilling { slot, .. }) => {
                let back = super::super::spill::lock(&slot).take();
                if let Some(mut parked) = back {
                    // Still in memory: taken back, the writer removes its file.
                    parked.truncate(keep);
                    self.stats.restores_in_memory += 1;
                    return self.enqueue(s, parked, feed);
                }
                // Written just now: read back once the write's end arrives.
                self.holders.insert(
                    lease,
                    Holder::Spilling {
                        slot,
                        then: AfterSpill::Restore(s.id),
                    },
                );
                super::spilling::Pending::Write
            }
            Some(Holder::Spilled { path, .. }) => super::spilling::Pending::File(path),
            _ => {
                // Dropped under pressure: recompute what it held.
                feed.splice(0..0, prefix);
                return self.enqueue(s, self.model.new_cache(dtype), feed);
            }
        };
        let id = s.id;
        self.enqueue(s, self.model.new_cache(dtype), feed);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.usage.prompt_tokens += prefix.len();
            seq.restore = Some(super::spilling::Restore {
                pending,
                len: prefix.len(),
                prefix: Some(prefix),
                dtype,
                since: std::time::Instant::now(),
            });
        }
    }

    /// Queues a request for admission with the cache it starts from and the tokens to
    /// feed.
    pub(super) fn enqueue(&mut self, s: Submission, cache: KvCache, feed: Vec<u32>) {
        let Submission {
            id,
            request,
            sampler,
            tx,
            submitted,
            needed_tokens,
            needed_bytes,
        } = s;
        let start_len = cache.len();
        self.sched.submit(id, cache.bytes(), needed_bytes);
        let label = request.label.unwrap_or_else(|| format!("request-{id}"));
        let span = tracing::debug_span!(
            parent: &request.span,
            "admission",
            request = id,
            agent = %label,
            cached = start_len,
            new = feed.len(),
            queue_ms = tracing::field::Empty,
            kv_bytes = needed_bytes,
        );
        let usage = Usage {
            prompt_tokens: start_len + feed.len(),
            cached_tokens: start_len,
            ..Usage::default()
        };
        let dec = super::Sequence::new(
            feed,
            sampler,
            request.constraint,
            &request.stop,
            request.max_tokens,
            request.ignore_eos,
        );
        self.seqs.insert(
            id,
            Seq {
                usage,
                cache,
                dec,
                holder: request.holder,
                tx,
                needed_tokens,
                start_len,
                submitted,
                admitted: None,
                admitted_at_step: 0,
                first_token: None,
                restored_in: std::time::Duration::ZERO,
                restore: None,
                span,
                label,
            },
        );
        self.note_kv();
    }
}
