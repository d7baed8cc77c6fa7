//! The adapter's own counters and their public snapshot.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the adapter (relaxed atomics, updated only on the pool's paths: requests
/// below the threshold are not counted, to keep the small-object path free of shared
/// writes).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) pool_allocs: AtomicU64,
    pub(super) pool_frees: AtomicU64,
    pub(super) zeroed_free: AtomicU64,
    pub(super) too_large: AtomicU64,
    pub(super) exhausted: AtomicU64,
    pub(super) nested: AtomicU64,
    pub(super) deferred_frees: AtomicU64,
    pub(super) grown_in_place: AtomicU64,
    pub(super) shrunk_in_place: AtomicU64,
    pub(super) moved_within_pool: AtomicU64,
    pub(super) moved_to_pool: AtomicU64,
    pub(super) moved_to_fallback: AtomicU64,
}

impl Counters {
    pub(super) const fn new() -> Self {
        Self {
            pool_allocs: AtomicU64::new(0),
            pool_frees: AtomicU64::new(0),
            zeroed_free: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            nested: AtomicU64::new(0),
            deferred_frees: AtomicU64::new(0),
            grown_in_place: AtomicU64::new(0),
            shrunk_in_place: AtomicU64::new(0),
            moved_within_pool: AtomicU64::new(0),
            moved_to_pool: AtomicU64::new(0),
            moved_to_fallback: AtomicU64::new(0),
        }
    }
}

#[inline]
pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counters of a [`PoolAlloc`](crate::PoolAlloc), from [`PoolAlloc::stats`](crate::PoolAlloc::stats). Requests below the threshold
/// go to the fallback uncounted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolAllocStats {
    /// Whether the pool is built and serving (false before the first pool-sized request,
    /// or if building it failed).
    pub pool_ready: bool,
    /// Whether new requests may go to the pool (see [`PoolAlloc::set_pool_enabled`](crate::PoolAlloc::set_pool_enabled)).
    pub pool_enabled: bool,
    /// Allocations served by the pool (`alloc`, `alloc_zeroed`, moves into the pool).
    pub pool_allocs: u64,
    /// Pool blocks freed by `dealloc` or by a `realloc` that moved them.
    pub pool_frees: u64,
    /// `alloc_zeroed` calls that got a known-zero block and skipped the `memset`.
    pub zeroed_without_memset: u64,
    /// Pool-sized requests sent to the fallback because size or alignment exceed the
    /// largest block.
    pub too_large: u64,
    /// Requests sent to the fallback because the pool had no block left.
    pub exhausted: u64,
    /// Requests made from inside the pool (while building it, or during `fork`) and
    /// served by the fallback.
    pub nested: u64,
    /// Pool blocks freed by a thread that could not take a pool lock (inside the pool
    /// already), and freed later by the next pool operation.
    pub deferred_frees: u64,
    /// `realloc`s that grew a pool block in place (its buddies were free).
    pub grown_in_place: u64,
    /// `realloc`s that shrank a pool block in place.
    pub shrunk_in_place: u64,
    /// `realloc`s that moved a pool block to another pool block.
    pub moved_within_pool: u64,
    /// `realloc`s that moved a fallback allocation into the pool (growing past the
    /// threshold).
    pub moved_to_pool: u64,
    /// `realloc`s that moved a pool block to the fallback (too large, or pool exhausted).
    pub moved_to_fallback: u64,
}

impl fmt::Display for PoolAllocStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "PoolAlloc: pool {}{}; {} pool allocs ({} zeroed without memset), {} pool frees",
            if self.pool_ready {
                "ready"
            } else {
                "not built"
            },
            if self.pool_enabled { "" } else { " (disabled)" },
            self.pool_allocs,
            self.zeroed_without_memset,
            self.pool_frees,
        )?;
        writeln!(
            f,
            "  to fallback: {} too large, {} exhausted, {} nested; {} frees deferred",
            self.too_large, self.exhausted, self.nested, self.deferred_frees
        )?;
        write!(
            f,
            "  realloc: {} grown in place, {} shrunk in place, {} moved within pool, {} into pool, {} out of pool",
            self.grown_in_place,
            self.shrunk_in_place,
            self.moved_within_pool,
            self.moved_to_pool,
            self.moved_to_fallback
        )
    }
}
