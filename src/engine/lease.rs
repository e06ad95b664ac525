//! The cache lease: the one value that ties the engine's accounting of a cache's
//! bytes to the bytes themselves, which the agent owns.
//!
//! A request that names a holder ([`Generate::holder`](super::Generate)) gets its
//! cache back in a [`LeasedCache`]: the cache and a [`Lease`] whose `Drop` tells the
//! engine to stop counting those bytes against the KV budget. Whatever ends the
//! agent's hold on the cache (an eviction, a reset, the agent stopping, a panic that
//! unwinds it, handing the cache to the next request) releases the accounting by
//! dropping the lease, so the two cannot drift apart. (The shape of mini-redis'
//! `DbDropGuard`: a guard holding a clone of the command channel.)
//!
//! Under KV pressure the engine sends the holder an [`Evict`] naming the lease; a
//! holder drops its cache only when the lease named is the one it holds, so a late
//! eviction cannot drop a cache the holder has since taken back and been handed
//! again. An agent about to wait on something slow (a tool call) parks its cache with
//! the engine instead ([`Park`](super::Park)): the engine holds the bytes and can drop
//! them at once under pressure, without waiting for the agent.

use std::sync::mpsc::Sender;

use super::worker::Command;
use crate::kv::{KvCache, KvDtype};

/// Identifies one lease (unique in the process, so a lease from one engine can never
/// be mistaken for another's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(u64);

impl LeaseId {
    /// A lease id never handed out before.
    pub(crate) fn fresh() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// The number the scheduler keys idle caches by.
    pub(crate) fn raw(self) -> u64 {
        self.0
    }

    pub(crate) fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

/// The engine's accounting of a cache held outside a request; dropping it releases
/// the accounting.
pub struct Lease {
    id: LeaseId,
    engine: Option<Sender<Command>>,
}

impl Lease {
    pub(crate) fn new(id: LeaseId, engine: Sender<Command>) -> Self {
        Self {
            id,
            engine: Some(engine),
        }
    }

    /// Which lease this is.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Ends the lease without a release message: the engine took the accounting
    /// over itself (the cache is in a request again).
    pub(crate) fn disarm(mut self) -> LeaseId {
        self.engine = None;
        self.id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            // An engine that stopped counts nothing any more.
            let _ = engine.send(Command::Release(self.id));
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lease").field(&self.id).finish()
    }
}

/// A cache, with the engine's lease on its bytes when an engine accounts for it.
/// It dereferences to the [`KvCache`].
#[derive(Debug, kameo::Reply)]
pub struct LeasedCache {
    cache: KvCache,
    lease: Option<Lease>,
}

impl LeasedCache {
    pub(crate) fn leased(cache: KvCache, lease: Lease) -> Self {
        Self {
            cache,
            lease: Some(lease),
        }
    }

    /// The lease, when an engine accounts for these bytes.
    pub fn lease(&self) -> Option<LeaseId> {
        self.lease.as_ref().map(Lease::id)
    }

    /// The cache and the lease.
    pub fn into_parts(self) -> (KvCache, Option<Lease>) {
        (self.cache, self.lease)
    }

    /// The cache; the lease (if any) is dropped, which releases the accounting.
    pub fn into_cache(self) -> KvCache {
        self.cache
    }
}

impl From<KvCache> for LeasedCache {
    fn from(cache: KvCache) -> Self {
        Self { cache, lease: None }
    }
}

impl std::ops::Deref for LeasedCache {
    type Target = KvCache;
    fn deref(&self) -> &KvCache {
        &self.cache
    }
}

impl std::ops::DerefMut for LeasedCache {
    fn deref_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }
}

/// A cache parked with the engine (see [`Park`](super::Park)): the engine holds the
/// bytes and may drop them under KV pressure. Name it in the next request
/// ([`Generate::resume`](super::Generate::resume)); dropping it drops the parked
/// bytes.
#[derive(Debug, kameo::Reply)]
pub struct ParkedCache {
    pub(crate) lease: Lease,
    pub(crate) len: usize,
    pub(crate) dtype: KvDtype,
}

impl ParkedCache {
    /// Tokens of the parked cache a resume continues from: what it held when it was
    /// parked, or fewer after [`truncate`](Self::truncate).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it held none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only its first `n` tokens (the holder's log disagreed past them): the
    /// request that resumes it cuts the cache there, wherever the engine held it
    /// (in memory or in a spill file).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
}

/// The engine asks a holder to drop the cache of `lease` (KV pressure). Holders
/// receive it through a `WeakRecipient<Evict>` they hand in with their request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evict {
    /// The lease to end; `None` asks to drop whatever cache is held (a caller's own
    /// eviction, as in the tests).
    pub lease: Option<LeaseId>,
}

impl Evict {
    /// Drop whatever cache is held now.
    pub const ANY: Evict = Evict { lease: None };

    /// Whether a cache under `held` should go.
    pub fn applies_to(&self, held: Option<LeaseId>) -> bool {
        self.lease.is_none() || self.lease == held
    }
}
