//! What a program calls on its global allocator from `main`: the hinter thread, statistics,
//! the consistency check, and the fork handlers.

use std::alloc::GlobalAlloc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::fork::install_fork_locks;
use super::reentry::Reentry;
use super::{PoolAlloc, PoolAllocStats, current_pid};
use crate::front::page_pool::HintReport;
use crate::policy::hint;
use crate::pool::Stats;

impl<F: GlobalAlloc> PoolAlloc<F> {
    // --- hinting, stats ----------------------------------------------------------------

    /// Starts the background hinter thread (`pagepool-hinter`) if it is not running in
    /// this process, building the pool first if needed, and installs the fork handlers
    /// ([`install_fork_handlers`](Self::install_fork_handlers)). Call it from `main`, never
    /// from inside an allocation. In a child after `fork` it starts a fresh thread.
    ///
    /// # Errors
    /// When the pool could not be built, or the thread could not be spawned.
    pub fn start_hinter(&'static self) -> std::io::Result<()>
    where
        F: Sync,
    {
        let core = match self.init() {
            Ok(()) => self
                .ready_core()
                .ok_or_else(|| std::io::Error::other("pagepool: the pool is being built"))?,
            Err(err) => {
                return Err(std::io::Error::other(format!(
                    "pagepool: the pool could not be built: {err}"
                )));
            }
        };
        self.install_fork_handlers()?;
        let pid = current_pid();
        let mut slot = self.hinter.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() && self.hinter_pid.load(Ordering::Acquire) == pid {
            return Ok(());
        }
        if let Some(stale) = slot.take() {
            // The thread belongs to the parent process: it does not exist here, and
            // joining or detaching its handle would act on a thread id of another process.
            std::mem::forget(stale);
        }
        // Requests the first pass before the thread exists, whatever state a stopped or
        // forked-away thread left.
        core.signal.start_listening();
        match crate::front::page_pool::spawn_hinter(move || hint::hinter_main(core, &core.signal)) {
            Ok(handle) => {
                *slot = Some(handle);
                self.hinter_pid.store(pid, Ordering::Release);
                Ok(())
            }
            Err(err) => {
                core.signal.stop();
                Err(err)
            }
        }
    }

    /// Stops the hinter thread and waits for it (no-op if it does not run in this process).
    pub fn stop_hinter(&self) {
        let handle = self.hinter.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(handle) = handle else { return };
        let Some(core) = self.ready_core() else {
            return;
        };
        core.signal.stop();
        if self.hinter_pid.swap(0, Ordering::AcqRel) == current_pid() {
            let _ = handle.join();
        } else {
            std::mem::forget(handle); // a thread of the parent process; see start_hinter
        }
    }

    /// Whether the hinter thread runs in this process (false in a child after `fork` until
    /// [`start_hinter`](Self::start_hinter) is called there).
    pub fn hinter_running(&self) -> bool {
        let pid = self.hinter_pid.load(Ordering::Acquire);
        pid != 0 && pid == current_pid()
    }

    /// Hints every unhinted free block at or above the hint order now, on this thread.
    /// Does nothing before the pool is built.
    pub fn hint_now(&self) -> HintReport {
        let Some(core) = self.ready_core() else {
            return HintReport::default();
        };
        let outcome = hint::run_pass(core, None, u64::MAX);
        HintReport {
            blocks: outcome.blocks,
            bytes: outcome.bytes,
            failures: outcome.failures,
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

    /// Registers `pthread_atfork` handlers that hold every shard lock of this pool across
    /// `fork` (see the type docs). Idempotent; [`start_hinter`](Self::start_hinter) calls
    /// it. Builds the pool if needed (a pool that is not built holds no locks).
    ///
    /// # Errors
    /// When more than 8 pools registered handlers, or `pthread_atfork` failed.
    pub fn install_fork_handlers(&'static self) -> std::io::Result<()>
    where
        F: Sync,
    {
        if self.init().is_err() {
            return Ok(()); // no pool, no locks to hold
        }
        let Some(core) = self.ready_core() else {
            return Ok(());
        };
        // Exactly one registration per pool: a second one would make `fork_prepare` take
        // the same locks twice and wait for itself.
        if self
            .fork_handlers
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(());
        }
        install_fork_locks(core).inspect_err(|_| self.fork_handlers.store(false, Ordering::Release))
    }
}
