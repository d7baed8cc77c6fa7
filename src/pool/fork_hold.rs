//! What a pool holds across `fork` (its shard locks and its capture queue's lock), and what
//! a child takes back afterwards. Driven by the registry's fork handlers.

use std::cell::UnsafeCell;

use super::PoolCore;
use crate::os::mapping::{Backing, MetaArray};
use crate::policy::capture::QueueHold;
use crate::shard::ShardHold;

/// Slots for the guards held between the prepare and parent/child handlers: one per shard
/// and one for the shared pool, mapped when the pool is built, because the handlers must
/// not allocate.
pub(super) struct ForkHolds {
    shards: MetaArray<UnsafeCell<Option<ShardHold<'static>>>>,
    queue: UnsafeCell<Option<QueueHold<'static>>>,
}

// SAFETY: the slots are written only by the forking thread, between its prepare handler and
// its parent or child handler, while it holds the registry lock.
unsafe impl Sync for ForkHolds {}
// SAFETY: as above.
unsafe impl Send for ForkHolds {}

impl ForkHolds {
    pub(super) fn new(slots: usize, backing: Backing) -> std::io::Result<Self> {
        Ok(Self {
            shards: MetaArray::new(slots, backing, false, |_| UnsafeCell::new(None))?,
            queue: UnsafeCell::new(None),
        })
    }
}

impl PoolCore {
    /// Takes every shard lock (per-CPU shards in index order, the shared pool last: the
    /// audit's order) and then the capture queue's lock, and keeps the guards.
    ///
    /// # Safety
    /// Called by the fork prepare handler with the registry lock held; the pool stays
    /// alive until [`release_fork_hold`](Self::release_fork_hold), which must follow on the
    /// same thread.
    pub(crate) unsafe fn hold_for_fork(&self) {
        for (shard, slot) in self.all_shards().zip(self.fork_holds.shards.iter()) {
            let hold = shard.hold();
            // SAFETY: the guard is dropped in `release_fork_hold`, while the pool is still
            // alive (the registry lock keeps it listed), so the 'static is never observed.
            let hold = unsafe { std::mem::transmute::<ShardHold<'_>, ShardHold<'static>>(hold) };
            // SAFETY: only the forking thread touches the slots (see `ForkHolds`).
            unsafe { *slot.get() = Some(hold) };
        }
        let queue = self.capture.hold();
        // SAFETY: as for the shard guards.
        let queue = unsafe { std::mem::transmute::<QueueHold<'_>, QueueHold<'static>>(queue) };
        // SAFETY: as above.
        unsafe { *self.fork_holds.queue.get() = Some(queue) };
    }

    /// Releases what [`hold_for_fork`](Self::hold_for_fork) took, in reverse order.
    ///
    /// # Safety
    /// On the thread that called `hold_for_fork`, with the registry lock still held.
    pub(crate) unsafe fn release_fork_hold(&self) {
        // SAFETY: see `ForkHolds`.
        drop(unsafe { (*self.fork_holds.queue.get()).take() });
        for slot in self.fork_holds.shards.iter().rev() {
            // SAFETY: as above.
            drop(unsafe { (*slot.get()).take() });
        }
    }

    /// In a child after `fork`, the only thread left: returns the blocks the parent's
    /// hinter had isolated (as unhinted), and drops the requests of threads waiting for
    /// capture (they do not exist here) with their reservations.
    pub(crate) fn recover_after_fork(&self) {
        if let Some(cpu) = &self.cpu {
            // A CPU another thread was draining (or, portable, had locked) at the fork.
            // SAFETY: the only thread of the child, in its fork handler.
            unsafe { cpu.reopen_after_fork() };
        }
        let env = self.env();
        for shard in self.all_shards() {
            let mut locked = shard.lock(&env);
            locked.return_all_isolated();
            locked.unreserve_all();
        }
        self.capture.forget_waiters();
    }
}
