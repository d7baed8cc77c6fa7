//! A sharded, concurrent page pool for userspace runtimes.
//!
//! One large anonymous mapping is carved into power-of-two blocks (4 KiB up to a
//! configurable maximum, 4 MiB by default) by per-CPU buddy allocators. Two ideas from the
//! Linux kernel make it more than a buddy allocator:
//!
//! 1. **Free page hinting.** Free blocks are *unhinted* (resident), *hinted* (given back
//!    with `MADV_FREE`) or *known-zero*. A background thread gives cold, high-order free
//!    blocks back to the OS in bounded batches and puts them at the tail; allocation takes
//!    unhinted blocks first, so memory returns to the OS without the hot path paying for
//!    refaults.
//! 2. **Capture.** A waiting large request ([`PagePool::alloc_wait`],
//!    [`PagePool::alloc_with_reclaim`]) takes blocks as concurrent frees coalesce them,
//!    before other allocations can eat the pieces: it reserves the region of its order
//!    closest to whole, so allocations skip that region's free pieces until it completes.
//!
//! # Quick start
//! ```
//! use pagepool::PagePool;
//!
//! let pool = PagePool::builder().capacity(256 << 20).build()?;
//! let block = pool.alloc(0)?;            // 4 KiB
//! let big = pool.alloc_zeroed(9)?;       // 2 MiB, zeroed
//! assert!(big.as_slice().iter().all(|&b| b == 0));
//! pool.free(block);
//! pool.free(big);
//! println!("{}", pool.stats());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Design: one way down
//! The modules form layers; each uses only the layers below it (a test,
//! `tests/layering.rs`, reads every `crate::` path and fails on an upward one):
//!
//! ```text
//!  front      PagePool, Block, LocalCache, PoolAlloc, Allocator impls   (the ways in)
//!    |
//!  slab       small objects for PoolAlloc: size classes, slabs carved from pool blocks,
//!    |        per-CPU object caches, CPU heaps, remote frees, idle release
//!  pool       PoolCore: shard choice, balancing, frees to the owner, capture waits,
//!    |        stats, the consistency audit
//!  policy     hint (free page hinting: signal, passes)   capture (waiting requests)
//!    |
//!  shard      one buddy allocator: lists, counters, small-block cache, reservations,
//!    |        isolation; knows nothing of hinting or capture (a `Handoff` trait, a flag)
//!  frame_table  16 bytes of out-of-band metadata per 4 KiB frame
//!    |
//!  config, error   settings as plain data, typed errors
//!  percpu     per-CPU stacks on restartable sequences (per-CPU block caches, slab)
//!  os         mapping, madvise, machine facts, process memory,     sync (std or loom)
//!             memory pressure events (PSI, cgroup files)
//! ```
//!
//! - `os::mapping`: the region, reserved with `MAP_NORESERVE` and aligned to the largest
//!   block, so a block's address says where its buddy is; metadata arrays mapped from the
//!   OS (a global allocator must not allocate through itself).
//! - `frame_table`: list links, state and order of each block head, and when a large block
//!   became free. Nothing is ever written into the blocks: hinted memory must stay
//!   untouched.
//! - `shard`: per-order free lists split by hint class, a cache of small freed blocks, and
//!   lock-free counters (monotonic `freed`/`bound`, as in the free page hinting series);
//!   `shard::reservation` keeps regions out of reach of allocation for capture requests.
//! - `policy::hint`: the isolate / advise / return protocol of Linux's free page reporting.
//! - `policy::capture`: the queue of waiting requests and the hand-off protocol.
//! - `pool`: [`PagePool`]'s core, without threads or reference counts, so it can live in a
//!   `static`.
//! - `slab`: the small-object allocator behind [`PoolAlloc`]: 79 size classes up to 32 KiB
//!   (the adapter uses those up to [`SLAB_OBJECT_LIMIT`], 8 KiB) in slabs (pool blocks of one class and one owner CPU, metadata out of band), a
//!   lock-free per-CPU cache per class on restartable sequences, frees from other CPUs
//!   through one lock-free queue per CPU heap, and the pool's client interface, so the
//!   hinter drains idle caches and the fork handlers hold the heaps' locks.
//! - `front`: [`PagePool`] and [`Block`], [`LocalCache`], [`PoolAlloc`], and (feature
//!   `allocator-api2`, on by default) `allocator_api2::Allocator` for both.
//! - `sync` is the only module that names `std::sync` or `loom`, so `--cfg loom` swaps every
//!   atomic, lock and thread at once and the loom models drive the real code.
//!
//! # Memory pressure
//! A runtime that must answer to an operator's memory limit can have its pools give their
//! free memory back the moment the kernel reports memory pressure:
//! [`PagePool::watch_pressure`] (and [`PoolAlloc::watch_pressure`]) with a
//! [`PressureSource`]: a PSI trigger (`/proc/pressure/memory` or a cgroup2
//! `memory.pressure`), a cgroup2 group's `memory.events`, or a cgroup v1 group's
//! `memory.pressure_level` with an optional usage threshold; [`PressureSource::detect`]
//! picks the best one this process has. One thread (`pagepool-pressure`) serves every
//! watching pool; it sleeps in `poll` without a timeout until the kernel reports, so it
//! costs nothing while there is no pressure. On an event every watching pool drains its
//! caches and gives every free block back with `MADV_DONTNEED`, and keeps advising
//! `MADV_DONTNEED` until no event came for a settle period. [`Stats::pressure`] counts what
//! it did.
//!
//! # For JIT runtimes
//! A JIT can take its code blocks from a pool of its own (see `examples/jit_code.rs`):
//!
//! - Write the code while the block is read+write, then `mprotect` it to read+execute
//!   before calling into it (and flush the instruction cache on architectures that need
//!   it). Never keep a block writable and executable at once.
//! - Each protection change splits the pool's mapping into separate kernel VMAs (at most
//!   `vm.max_map_count`, 65530 by default, per process): protect whole blocks, and prefer
//!   few larger code blocks to many small ones.
//! - **Restore read+write before freeing a block.** The pool hands the block out again to
//!   code that will write to it, and the hinter's `madvise` and later merges treat it as
//!   ordinary memory.
//! - A pool dedicated to code keeps code blocks near each other: every block lies inside
//!   one region, so with a capacity up to 2 GiB any two blocks are within reach of x86-64
//!   `rel32` calls and jumps (and, up to 128 MiB, of AArch64 `BL`), without a mixed pool's
//!   data blocks in between.
//!
//! # Invariants
//! - Every frame is either the head of exactly one block (free, cached, allocated or
//!   isolated) or interior to one; splits and merges keep this with one write each.
//! - A block's metadata is written only under the lock of the shard that owns its chunk.
//! - `free + allocated + in-flight == capacity` at every quiescent point;
//!   [`PagePool::check_consistency`] checks it, with the lists and counters.

#![warn(missing_docs)]

mod config;
mod error;
mod frame_table;
mod front;
mod os;
#[allow(dead_code)] // the per-CPU caches build on it
mod percpu;
mod policy;
mod pool;
mod shard;
#[cfg_attr(loom, allow(dead_code))] // the global allocator, its user, is not built under loom
mod slab;
mod sync;

pub use config::{
    AllocPolicy, Backing, CpuCacheMode, DEFAULT_CPU_CACHE_BYTES, DEFAULT_MAX_ORDER, HintMode,
    MAX_HINT_DURATION, PoolBuilder,
};
pub use error::{AllocError, BuildError, FreeError};
pub use front::alloc_async::AllocAsync;
#[cfg(not(loom))]
pub use front::global::{
    DEFAULT_MIN_POOL_SIZE, DIRECT_MAP_MIN, GLOBAL_HINT_MIN_ORDER, GLOBAL_IDLE_HINT_MIN_ORDER,
    GLOBAL_MAX_ORDER, PoolAlloc, PoolAllocStats, SLAB_OBJECT_LIMIT,
};
pub use front::guard::{BlockGuard, OwnedBlock};
pub use front::local_cache::{DEFAULT_LOCAL_CACHE_BLOCKS, LocalCache};
pub use front::{Block, PagePool};
#[doc(hidden)]
pub use os::advice::Advisor;
pub use os::memory::{ProcessMemory, minor_faults};
pub use pool::evict::{Advice, BatchError};
pub use pool::release::HintReport;
pub use pool::stats::{CaptureStats, HintStats, OrderStats, Stats};
pub use pool::wait::RECLAIM_STALL_ROUNDS;

// The memory pressure watcher.
pub use config::{
    DEFAULT_PRESSURE_SETTLE, DEFAULT_PSI_STALL, DEFAULT_PSI_WINDOW, PSI_MAX_WINDOW, PSI_MIN_WINDOW,
    PressureLevel, PressureSource,
};
pub use error::PressureSourceError;
pub use pool::pressure::MAX_PRESSURE_SOURCES;
pub use pool::stats::PressureStats;

/// log2 of [`FRAME_SIZE`].
pub const FRAME_SHIFT: usize = 12;
/// Bytes in an order-0 block: one 4 KiB frame.
pub const FRAME_SIZE: usize = 1 << FRAME_SHIFT;
/// The largest `max_order` a pool accepts: order 20, 4 GiB blocks (loom: 3).
pub const MAX_SUPPORTED_ORDER: u8 = if cfg!(loom) { 3 } else { 20 };
/// The most shards a pool accepts.
pub const MAX_SHARDS: usize = 4096;

/// Bytes in a block of `order`.
///
/// ```
/// assert_eq!(pagepool::block_size(0), 4096);
/// assert_eq!(pagepool::block_size(9), 2 << 20);
/// ```
#[inline]
pub const fn block_size(order: u8) -> usize {
    FRAME_SIZE << order
}

/// The smallest order whose blocks hold `size` bytes aligned to `align` (blocks are aligned
/// to their size). `None` if it would exceed [`MAX_SUPPORTED_ORDER`] or `align` is not a
/// power of two.
///
/// ```
/// assert_eq!(pagepool::order_for(1, 1), Some(0));
/// assert_eq!(pagepool::order_for(4097, 8), Some(1));
/// assert_eq!(pagepool::order_for(100, 65536), Some(4));
/// ```
#[inline]
pub const fn order_for(size: usize, align: usize) -> Option<u8> {
    if !align.is_power_of_two() {
        return None;
    }
    let need = if size > align { size } else { align };
    if need <= FRAME_SIZE {
        return Some(0);
    }
    let order = (usize::BITS - (need - 1).leading_zeros()) as usize - FRAME_SHIFT;
    if order > MAX_SUPPORTED_ORDER as usize {
        None
    } else {
        Some(order as u8)
    }
}
