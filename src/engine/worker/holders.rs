//! The engine's side of the cache lease: accounting idle caches held outside the
//! engine, parking caches here, handing caches back leased, asking holders to evict,
//! and taking a request's cache (leased or parked) into the engine.

use super::super::lease::{Evict, Lease, LeaseId, LeasedCache};
use super::super::Usage;
use super::{Holder, Seq, Submission, Worker};
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

    /// A lease ended: its bytes are no longer counted (a parked cache is dropped).
    pub(super) fn release(&mut self, lease: LeaseId) {
        self.sched.release(lease.raw());
        self.holders.remove(&lease);
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

    /// Asks the holders of `leases` to drop their caches: a parked cache goes at once;
    /// a remote holder gets an [`Evict`] naming the lease (its drop of the lease
    /// releases the bytes). Returns whether any bytes were freed already.
    pub(super) fn evict(&mut self, leases: &[u64]) -> bool {
        let mut freed = false;
        for &raw in leases {
            let lease = LeaseId::from_raw(raw);
            match self.holders.get(&lease) {
                Some(Holder::Parked(_)) => {
                    tracing::debug!(lease = raw, "dropped a parked cache");
                    self.release(lease);
                    self.stats.evictions_requested += 1;
                    freed = true;
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
                None => {}
            }
        }
        freed
    }

    /// Takes a checked request in: its cache (a lease on it ends here, the request
    /// accounts for it now; a parked one is taken back, or recomputed from the
    /// request's prefix when it was dropped), queued for admission.
    pub(super) fn submit(&mut self, s: Submission) {
        let Submission {
            id,
            request,
            sampler,
            tx,
            submitted,
            needed_tokens,
            needed_bytes,
        } = s;
        if self
            .hooks
            .exit_engine_on_token
            .is_some_and(|t| request.tokens.contains(&t))
        {
            // The submission is dropped with its stream's sender, as in a dead thread.
            self.exit = true;
            return;
        }
        if let Some(t) = self.hooks.crash_engine_on_token {
            if request.tokens.contains(&t) {
                // Outside every `catch_unwind`: the engine thread dies.
                panic!("test hook: the engine thread crashes on token {t}");
            }
        }
        let (mut cache, lease) = request.cache.into_parts();
        if let Some(lease) = lease {
            self.release(lease.disarm());
        }
        let mut feed = request.tokens;
        if let Some(resume) = request.resume {
            let lease = resume.parked.lease.disarm();
            match self.holders.remove(&lease) {
                Some(Holder::Parked(parked)) => cache = parked,
                _ => {
                    // Dropped under pressure: recompute what it held.
                    cache = self.model.new_cache(resume.parked.dtype);
                    feed.splice(0..0, resume.prefix);
                }
            }
            self.sched.release(lease.raw());
        }
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
                span,
                label,
            },
        );
        self.note_kv();
    }
}
