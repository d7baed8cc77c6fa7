//! What a program calls on its global allocator from `main`: the hinter thread, statistics,
//! the consistency check.

use std::alloc::GlobalAlloc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::reentry::Reentry;
use super::{PoolAlloc, PoolAllocStats};
use crate::pool::Stats;
use crate::pool::registry::registry;
use crate::pool::release::HintReport;

impl<F: GlobalAlloc> PoolAlloc<F> {
    // --- hinting, stats ----------------------------------------------------------------

    /// Asks the process's hinter thread (`pagepool-hinter`) to serve this pool, building
    /// the pool first if needed, and starting the thread if none runs in this process (one
    /// thread serves every pool of the process). Call it from `main`, never from inside an
    /// allocation. In a child after `fork` it starts a fresh thread.
    ///
    /// # Errors
    /// When the pool could not be built, or the thread could not be spawned.
    pub fn start_hinter(&self) -> std::io::Result<()> {
        match self.init() {
            Ok(()) => {}
            Err(err) => {
                return Err(std::io::Error::other(format!(
                    "pagepool: the pool could not be built: {err}"
                )));
            }
        }
        let core = self
            .ready_core()
            .ok_or_else(|| std::io::Error::other("pagepool: the pool is being built"))?;
        registry().start_hinting(core)
    }

    /// Stops hinting this pool and waits for a pass on it to end (and for the thread to
    /// exit, if no other pool of the process asks for hinting).
    pub fn stop_hinter(&self) {
        if let Some(core) = self.ready_core() {
            registry().stop_hinting(core);
        }
    }

    /// Whether the hinter thread runs in this process and serves this pool (false in a
    /// child after `fork` until [`start_hinter`](Self::start_hinter) is called there).
    pub fn hinter_running(&self) -> bool {
        self.ready_core()
            .is_some_and(|core| registry().hinting(core))
    }

    /// Hints every unhinted free block at or above the hint order now, on this thread.
    /// Does nothing before the pool is built.
    pub fn hint_now(&self) -> HintReport {
        let Some(core) = self.ready_core() else {
            return HintReport::default();
        };
        core.hint_now()
    }

    /// Gives back every free byte the pool can, now: see
    /// [`PagePool::release_idle`](crate::PagePool::release_idle). Does nothing before the
    /// pool is built.
    pub fn release_idle(&self) -> HintReport {
        match self.ready_core() {
            Some(core) => core.release_idle(core.hint_min_order()),
            None => HintReport::default(),
        }
    }

    /// Merges the shards' small-block caches back into the buddy lists.
    pub fn drain_caches(&self) {
        if let Some(core) = self.ready_core() {
            core.drain_caches();
        }
    }

    /// The adapter's counters. Cheap and allocation-free.
    pub fn stats(&self) -> PoolAllocStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PoolAllocStats {
            pool_ready: self.ready_core().is_some(),
            pool_enabled: self.enabled.load(Ordering::Relaxed),
            pool_allocs: load(&c.pool_allocs),
            pool_frees: load(&c.pool_frees),
            zeroed_without_memset: load(&c.zeroed_free),
            too_large: load(&c.too_large),
            exhausted: load(&c.exhausted),
            nested: load(&c.nested),
            deferred_frees: load(&c.deferred_frees),
            grown_in_place: load(&c.grown_in_place),
            shrunk_in_place: load(&c.shrunk_in_place),
            moved_within_pool: load(&c.moved_within_pool),
            moved_to_pool: load(&c.moved_to_pool),
            moved_to_fallback: load(&c.moved_to_fallback),
        }
    }

    /// The pool's own counters (per order, hinting, capture), or `None` before it is
    /// built. Allocates the snapshot's vectors (through the global allocator, which is
    /// fine outside an allocation).
    pub fn pool_stats(&self) -> Option<Stats> {
        self.ready_core().map(|core| core.stats())
    }

    /// Checks the pool's lists, frame table and counters against each other; `Ok` before
    /// the pool is built. Locks every shard while it runs; its own allocations go to the
    /// fallback. Meant for tests.
    ///
    /// # Errors
    /// A description of the first inconsistency.
    pub fn check_consistency(&self) -> Result<(), String> {
        let Some(core) = self.ready_core() else {
            return Ok(());
        };
        let Some(_guard) = Reentry::enter() else {
            return Ok(());
        };
        core.check_consistency()
    }
}
