//! The adapter's own counters and their public snapshot.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// Counters of the adapter (relaxed atomics, updated only on paths that take a lock or
/// make a system call anyway; the small-object layer keeps its own books per CPU heap,
/// and the page-block counts, written on the lock-free per-CPU paths too, are kept per
/// thread: [`PageCounts`]).
pub(super) struct Counters {
    pub(super) zeroed_free: AtomicU64,
    pub(super) too_large: AtomicU64,
    pub(super) huge_unmapped: AtomicU64,
    pub(super) huge_bytes: AtomicU64,
    pub(super) huge_remaps: AtomicU64,
    pub(super) exhausted: AtomicU64,
    pub(super) nested: AtomicU64,
    pub(super) deferred_frees: AtomicU64,
    pub(super) grown_in_place: AtomicU64,
    pub(super) shrunk_in_place: AtomicU64,
    pub(super) moved_within_pool: AtomicU64,
    pub(super) moved_to_pool: AtomicU64,
    pub(super) moved_to_fallback: AtomicU64,
    pub(super) moved_out_of_pool: AtomicU64,
}

impl Counters {
    pub(super) const fn new() -> Self {
        Self {
            zeroed_free: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            huge_unmapped: AtomicU64::new(0),
            huge_bytes: AtomicU64::new(0),
            huge_remaps: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            nested: AtomicU64::new(0),
            deferred_frees: AtomicU64::new(0),
            grown_in_place: AtomicU64::new(0),
            shrunk_in_place: AtomicU64::new(0),
            moved_within_pool: AtomicU64::new(0),
            moved_to_pool: AtomicU64::new(0),
            moved_to_fallback: AtomicU64::new(0),
            moved_out_of_pool: AtomicU64::new(0),
        }
    }
}

/// Threads that get a slot of their own in every [`PageCounts`]; later threads share
/// [`STRIPES`] more (still exact, with an atomic read-modify-write).
const SLOTS: usize = 64;
/// Shared slots for the threads after the first [`SLOTS`] (a process that keeps creating
/// threads), picked by thread number so that they rarely meet.
const STRIPES: usize = 16;

/// Page blocks served and freed. A page block comes from a per-CPU cache without a lock,
/// so these counts are on the fast path: one shared counter would be the cache line where
/// every CPU meets (2 MiB allocations on two threads ran at 0.78x the throughput of one),
/// and even a counter per thread costs about 5 ns per count if it is bumped with a locked
/// instruction. So each of the first [`SLOTS`] threads of the process owns a slot, which
/// only it writes, with a plain load and store; later threads count atomically in one of
/// [`STRIPES`] shared slots; readers add them all up. (Slots are never handed back: that
/// would need a destructor at thread exit, which may allocate.)
pub(super) struct PageCounts {
    slots: [CachePadded<Slot>; SLOTS],
    /// For the threads after the first [`SLOTS`].
    shared: [CachePadded<Slot>; STRIPES],
}

struct Slot {
    allocs: AtomicU64,
    frees: AtomicU64,
}

impl Slot {
    const fn new() -> Self {
        Self {
            allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
        }
    }
}

impl PageCounts {
    pub(super) const fn new() -> Self {
        Self {
            slots: [const { CachePadded::new(Slot::new()) }; SLOTS],
            shared: [const { CachePadded::new(Slot::new()) }; STRIPES],
        }
    }

    #[inline]
    pub(super) fn allocated(&self) {
        self.count(|slot| &slot.allocs);
    }

    #[inline]
    pub(super) fn freed(&self) {
        self.count(|slot| &slot.frees);
    }

    #[inline]
    fn count(&self, counter: impl Fn(&Slot) -> &AtomicU64) {
        let thread = thread_number();
        match self.slots.get(thread) {
            Some(slot) => {
                // Only this thread writes its slot: no read-modify-write needed.
                let c = counter(slot);
                c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            None => bump(counter(&self.shared[thread % STRIPES])),
        }
    }

    /// `(allocations, frees)`, summed over the slots.
    pub(super) fn totals(&self) -> (u64, u64) {
        self.slots
            .iter()
            .chain(&self.shared)
            .fold((0, 0), |(a, f), s| {
                (
                    a + s.allocs.load(Ordering::Relaxed),
                    f + s.frees.load(Ordering::Relaxed),
                )
            })
    }
}

/// The calling thread's number, unique in the process, given out on its first use (so a
/// thread's slot is its own in every adapter; threads past [`SLOTS`] share). A
/// constant initialiser and no destructor: usable inside `alloc` and while a thread
/// exits. A forked child's only thread keeps its number, which no other thread of the
/// child has.
#[inline]
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SLOT.try_with(|s| {
        let mut at = s.get();
        if at == usize::MAX {
            at = NEXT.fetch_add(1, Ordering::Relaxed).min(usize::MAX - 1);
            s.set(at);
        }
        at
    })
    .unwrap_or(usize::MAX)
}

#[inline]
pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `delta` (wrapping: a negated value subtracts).
#[inline]
pub(super) fn add(counter: &AtomicU64, delta: u64) {
    counter.fetch_add(delta, Ordering::Relaxed);
}

/// Counters of a [`PoolAlloc`](crate::PoolAlloc), from
/// [`PoolAlloc::stats`](crate::PoolAlloc::stats).
///
/// The small-object fields are sums over the CPU heaps and caches, read without locks:
/// exact when nothing runs, a close estimate otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolAllocStats {
    /// Whether the pool is built and serving (false before the first request, or if
    /// building it failed).
    pub pool_ready: bool,
    /// Whether the small-object fast paths run on restartable sequences (Linux `rseq`, no
    /// lock and no atomic read-modify-write); `false` before the pool is built and where
    /// the portable per-CPU caches (one atomic swap per operation) serve instead.
    pub per_cpu_rseq: bool,
    /// Whether new requests may go to the pool (see
    /// [`PoolAlloc::set_pool_enabled`](crate::PoolAlloc::set_pool_enabled)).
    pub pool_enabled: bool,
    /// Page blocks the pool served (`alloc`, `alloc_zeroed`, moves into the pool); small
    /// objects are not counted here (see `slab_refills`).
    pub pool_allocs: u64,
    /// Page blocks freed by `dealloc` or by a `realloc` that moved them.
    pub pool_frees: u64,
    /// Zeroed requests that got known-zero memory (a known-zero block or a direct
    /// mapping) and skipped the `memset` (small objects are not counted).
    pub zeroed_without_memset: u64,
    /// Requests above the largest block (size or alignment), each served by a mapping of
    /// its own.
    pub too_large: u64,
    /// Direct mappings alive now.
    pub huge_mappings: u64,
    /// Bytes of the direct mappings alive now (as requested).
    pub huge_bytes: u64,
    /// `realloc`s of a direct mapping done with `mremap` (no copy).
    pub huge_remaps: u64,
    /// Requests sent to the fallback because the pool had no memory left, after the
    /// small-object layer gave back everything it held unused.
    pub exhausted: u64,
    /// Requests made from inside the pool (while building it, or during `fork`, or from
    /// a thread holding a pool lock) that the lock-free paths could not serve and the
    /// fallback did.
    pub nested: u64,
    /// Page blocks freed by a thread that could not take a pool lock (inside the pool
    /// already), and freed later by the next pool operation.
    pub deferred_frees: u64,
    /// `realloc`s that grew a page block in place (its buddies were free).
    pub grown_in_place: u64,
    /// `realloc`s that shrank a page block in place.
    pub shrunk_in_place: u64,
    /// `realloc`s that moved a page block to another allocation in the pool (a block or a
    /// small object).
    pub moved_within_pool: u64,
    /// `realloc`s that moved a fallback allocation into the pool.
    pub moved_to_pool: u64,
    /// `realloc`s that moved a page block to the fallback (pool exhausted or switched off).
    pub moved_to_fallback: u64,
    /// `realloc`s that moved a page block into a direct mapping (grown past the largest
    /// block).
    pub moved_out_of_pool: u64,
    /// Bytes of pool blocks held as slabs (including empty ones kept for reuse).
    pub slab_bytes: u64,
    /// Slabs held.
    pub slabs: u64,
    /// Bytes of free small objects in the per-CPU caches.
    pub slab_cached_bytes: u64,
    /// Small objects in use (or freed on another CPU and not yet collected by their
    /// owner).
    pub slab_live_objects: u64,
    /// Bytes of those objects (their classes' sizes).
    pub slab_live_bytes: u64,
    /// Refills of an empty per-CPU cache under a CPU heap's lock (a small-object slow
    /// path).
    pub slab_refills: u64,
    /// Spills of a full per-CPU cache under a CPU heap's lock (the other slow path).
    pub slab_spills: u64,
    /// Small objects freed on a CPU other than their owner's, collected by the owner.
    pub remote_frees: u64,
    /// Slabs taken from the pool since the start.
    pub slabs_made: u64,
    /// Emptied slabs given back to the pool since the start.
    pub slabs_released: u64,
}

impl fmt::Display for PoolAllocStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        writeln!(
            f,
            "PoolAlloc: pool {}{}",
            if self.pool_ready {
                "ready"
            } else {
                "not built"
            },
            if self.pool_enabled { "" } else { " (disabled)" },
        )?;
        writeln!(
            f,
            "  small objects: {} live ({:.1} MiB), {:.1} MiB cached, {} slabs ({:.1} MiB); {} refills, {} spills, {} remote frees; {} slabs made, {} released",
            self.slab_live_objects,
            mib(self.slab_live_bytes),
            mib(self.slab_cached_bytes),
            self.slabs,
            mib(self.slab_bytes),
            self.slab_refills,
            self.slab_spills,
            self.remote_frees,
            self.slabs_made,
            self.slabs_released,
        )?;
        writeln!(
            f,
            "  page blocks: {} allocs ({} zeroed without memset), {} frees; {} frees deferred",
            self.pool_allocs, self.zeroed_without_memset, self.pool_frees, self.deferred_frees,
        )?;
        writeln!(
            f,
            "  direct mappings: {} made, {} alive ({:.1} MiB), {} remapped",
            self.too_large,
            self.huge_mappings,
            mib(self.huge_bytes),
            self.huge_remaps,
        )?;
        writeln!(
            f,
            "  to fallback: {} exhausted, {} nested",
            self.exhausted, self.nested
        )?;
        write!(
            f,
            "  realloc: {} grown in place, {} shrunk in place, {} moved within pool, {} into pool, {} to fallback, {} to a mapping",
            self.grown_in_place,
            self.shrunk_in_place,
            self.moved_within_pool,
            self.moved_to_pool,
            self.moved_to_fallback,
            self.moved_out_of_pool,
        )
    }
}
