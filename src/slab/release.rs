//! Giving idle memory back, and what the layer holds across `fork`.
//!
//! # Idle release
//! The pool's hinter thread calls [`Client::release_idle`](crate::pool::client::Client)
//! before each pass, with the hint delay. For every CPU:
//!
//! - the per-CPU stacks' activity mark (`take_activity`, set by every cache operation on
//!   the CPU) says whether the CPU allocated or freed since the last call; the heap keeps
//!   when that was last seen;
//! - a CPU idle for the delay has its caches drained (`drain_cpu`: every object back to
//!   its slab, under the heap lock);
//! - every heap's remote queue is collected, so objects freed to an idle CPU return too;
//! - spares that have been spares for the delay go back to the pool.
//!
//! Slabs emptied on the way go back to the pool, whose hinting pass right after can
//! return them to the OS once they coalesce. The answer is when to come back: the soonest
//! an active CPU's cache or a spare could turn idle, or `None` when nothing is held. In
//! that case the next slow path asks the hinter for a pass again (`wake_hinter`), so an
//! idle process is not woken up for nothing, and a busy one is looked at again.
//!
//! `release(None)` gives back everything at once: for pool exhaustion, for
//! `PoolAlloc::drain_caches`, and when the layer is dropped.

use super::SlabAlloc;
use crate::sync::{Ordering, now_ms};

impl SlabAlloc {
    /// The idle release; see the module docs. The caller is inside the allocator
    /// ([`Reentry`](super::reentry::Reentry) set), so nothing it allocates meanwhile could
    /// wait for a heap lock it holds.
    pub(crate) fn release(&self, idle_ms: Option<u32>) -> Option<u32> {
        let now = now_ms();
        let mut wait: Option<u32> = None;
        let mut soonest = |w: u32| wait = Some(wait.map_or(w, |old: u32| old.min(w)));
        for cpu in 0..self.heaps.len() {
            let heap = &self.heaps[cpu];
            let active = self.caches.take_activity(cpu);
            let mut locked = self.lock(cpu);
            if active {
                heap.last_active.store(now, Ordering::Relaxed);
            }
            let idle_for = now.wrapping_sub(heap.last_active.load(Ordering::Relaxed));
            let (drain, idle_since) = match idle_ms {
                None => (true, now),
                // Idle since `idle_for` ago, but no older than the delay counts (a heap
                // whose activity was never seen has no meaningful stamp).
                Some(ms) if !active && idle_for >= ms => (true, now.wrapping_sub(ms)),
                Some(_) => (false, now),
            };
            // What this look frees is housekeeping, unused since `idle_since`.
            locked.release_as_idle_since(idle_since);
            // An empty cache needs no drain (and no `membarrier`); a push racing this
            // look is found by the next pass.
            if drain && self.cached_on(cpu) > 0 {
                // The CPU's cache holds only this heap's objects.
                self.caches
                    .drain_cpu(cpu, |_class, items| locked.put_back_items(items));
            }
            locked.collect_remote();
            if let Some(w) = locked.release_spares(now, idle_ms) {
                soonest(w);
            }
            drop(locked);
            if let Some(ms) = idle_ms
                && !drain
                && self.cached_on(cpu) > 0
            {
                soonest(ms.saturating_sub(idle_for).max(1));
            }
        }
        self.hinter_idle.store(wait.is_none(), Ordering::Relaxed);
        wait
    }

    /// Objects in CPU `cpu`'s caches (a racy snapshot).
    pub(crate) fn cached_on(&self, cpu: usize) -> usize {
        (0..self.caches.classes())
            .map(|class| self.caches.len(cpu, class))
            .sum()
    }
}

// === fork ===

#[cfg(not(any(loom, miri)))]
pub(super) use holds::ForkHolds;

#[cfg(not(any(loom, miri)))]
mod holds {
    use std::cell::UnsafeCell;

    use super::super::SlabAlloc;
    use super::super::heap::HeapState;
    use crate::os::mapping::{Backing, MetaArray};
    use crate::sync::MutexGuard;

    /// Slots for the heap guards held between the fork handlers, mapped up front because
    /// the handlers must not allocate.
    pub(crate) struct ForkHolds(MetaArray<UnsafeCell<Option<MutexGuard<'static, HeapState>>>>);

    // SAFETY: the slots are touched only by the forking thread, between its prepare
    // handler and its parent or child handler, under the registry lock.
    unsafe impl Sync for ForkHolds {}
    // SAFETY: as above.
    unsafe impl Send for ForkHolds {}

    impl ForkHolds {
        pub(crate) fn new(heaps: usize, backing: Backing) -> std::io::Result<Self> {
            Ok(Self(MetaArray::new(heaps, backing, false, |_| {
                UnsafeCell::new(None)
            })?))
        }
    }

    impl SlabAlloc {
        /// Takes every heap lock, in index order, and keeps the guards.
        pub(crate) fn hold_heaps_for_fork(&self) {
            for (heap, slot) in self.heaps.iter().zip(self.fork_holds.0.iter()) {
                let guard = heap.state.lock();
                // SAFETY: the guard is dropped in `release_heaps_after_fork`, on this
                // thread, while the layer is alive (its pool is listed in the registry,
                // whose lock the fork handlers hold), so the 'static is never observed.
                let guard = unsafe {
                    std::mem::transmute::<MutexGuard<'_, HeapState>, MutexGuard<'static, HeapState>>(
                        guard,
                    )
                };
                // SAFETY: only the forking thread touches the slots (see `ForkHolds`).
                unsafe { *slot.get() = Some(guard) };
            }
        }

        /// Releases what `hold_heaps_for_fork` took, in reverse order.
        pub(crate) fn release_heaps_after_fork(&self) {
            for slot in self.fork_holds.0.iter().rev() {
                // SAFETY: as above.
                drop(unsafe { (*slot.get()).take() });
            }
        }
    }
}

#[cfg(any(loom, miri))]
impl SlabAlloc {
    /// No fork handlers under loom and Miri.
    pub(crate) fn hold_heaps_for_fork(&self) {}

    /// No fork handlers under loom and Miri.
    pub(crate) fn release_heaps_after_fork(&self) {}
}
