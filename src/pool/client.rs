//! Layers above the pool that keep some of its memory in structures of their own (the
//! small-object allocator's per-CPU caches and slabs). The pool's hinter and its fork
//! handlers reach them through [`Client`], so that memory is returned when idle and its
//! locks are held across `fork` like the pool's own.
//!
//! A pool has at most one client, attached once with [`PoolCore::attach`].

use super::PoolCore;

/// What the pool asks of a layer that holds some of its memory.
#[cfg_attr(any(loom, miri), allow(dead_code))] // no fork handlers there
pub(crate) trait Client: Sync {
    /// Gives back to the pool what sat unused for at least `idle_ms` (everything for
    /// `None`). Returns the milliseconds until something it still holds could turn idle,
    /// or `None` when it holds nothing the hinter should come back for. Called by the
    /// hinter thread with no pool lock held.
    fn release_idle(&self, idle_ms: Option<u32>) -> Option<u32>;

    /// Before `fork`: takes every lock of its own, before the pool takes its locks (a
    /// client calls the pool with its locks held, never the other way round).
    fn hold_for_fork(&self);

    /// After `fork`, in parent and child: releases what `hold_for_fork` took.
    fn release_fork_hold(&self);

    /// In the child after `fork` (locks released, one thread): takes back what the
    /// parent's other threads held, if it can.
    fn recover_after_fork(&self);
}

impl PoolCore {
    /// Attaches the client; `false` if one is attached already.
    #[allow(dead_code)] // the small-object allocator attaches itself
    pub(crate) fn attach(&self, client: &'static dyn Client) -> bool {
        self.client.set(client).is_ok()
    }

    /// Asks the caches that hold free memory outside the shards (the client's) to give
    /// back what sat idle for `idle_ms` (everything for `None`); returns the milliseconds
    /// until more could turn idle.
    pub(crate) fn release_idle_caches(&self, idle_ms: Option<u32>) -> Option<u32> {
        // The client first: what it gives back may land in a per-CPU cache.
        let client = self
            .client()
            .and_then(|client| client.release_idle(idle_ms));
        let cpu = self.release_idle_cpu_caches(idle_ms);
        match (client, cpu) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The attached client, if any.
    #[inline]
    pub(crate) fn client(&self) -> Option<&'static dyn Client> {
        self.client.get().copied()
    }
}
