//! Lock-free counters of one order in one shard.
//!
//! Only the shard's lock holder writes them (a relaxed load and a release store, no
//! read-modify-write); anyone reads them without the lock.

use crate::frame_table::FreeClass;
use crate::sync::{AtomicU64, Ordering};

/// Lock-free counters of one order in one shard.
///
/// `freed` and `bound` are monotonic (the `nr_freed` / `nr_bound` split of the 2019 free
/// page hinting patches): `freed` counts blocks that entered
/// this order's free lists or cache, `bound` those that left (allocated, split, merged,
/// isolated). Their difference is the free count, and a reader holding an older `freed`
/// knows how many blocks were freed since. The rest are gauges.
#[derive(Default)]
pub(crate) struct OrderCounters {
    pub(crate) freed: AtomicU64,
    pub(crate) bound: AtomicU64,
    /// Free blocks that are hinted.
    pub(crate) hinted: AtomicU64,
    /// Free blocks known to be zero.
    pub(crate) zero: AtomicU64,
    /// Free blocks in the small-block cache (counted in `freed - bound` too).
    pub(crate) cached: AtomicU64,
    /// Blocks handed out.
    pub(crate) allocated: AtomicU64,
    /// Blocks isolated by the hinter.
    pub(crate) in_flight: AtomicU64,
}

/// Adds `delta` (wrapping, so `u64::MAX` subtracts one). Only the shard's lock holder
/// writes, so a load and a store replace a locked read-modify-write.
#[inline]
pub(super) fn bump(counter: &AtomicU64, delta: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(delta),
        Ordering::Release,
    );
}

pub(super) const DEC: u64 = u64::MAX;

impl OrderCounters {
    pub(super) fn entered(&self, class: FreeClass) {
        bump(&self.freed, 1);
        match class {
            FreeClass::Unhinted => {}
            FreeClass::Hinted => bump(&self.hinted, 1),
            FreeClass::Zero => bump(&self.zero, 1),
        }
    }

    pub(super) fn left(&self, class: FreeClass) {
        match class {
            FreeClass::Unhinted => {}
            FreeClass::Hinted => bump(&self.hinted, DEC),
            FreeClass::Zero => bump(&self.zero, DEC),
        }
        bump(&self.bound, 1);
    }

    /// A consistent-enough free count: `bound` is read first, and `freed` never trails it.
    pub(crate) fn free(&self) -> u64 {
        let bound = self.bound.load(Ordering::Acquire);
        let freed = self.freed.load(Ordering::Acquire);
        freed.saturating_sub(bound)
    }

    /// Free blocks that are resident and neither cached nor hinted nor zero.
    pub(crate) fn unhinted(&self) -> u64 {
        let other = self.hinted.load(Ordering::Acquire)
            + self.zero.load(Ordering::Acquire)
            + self.cached.load(Ordering::Acquire);
        self.free().saturating_sub(other)
    }
}
