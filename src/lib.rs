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
//! # Design
//! Each idea lives in one module:
//!
//! - `region`: the mapping, reserved with `MAP_NORESERVE` and
//!   aligned to the largest block, so a block's address says where its buddy is.
//! - `frame_table`: out-of-band metadata, 16 bytes per 4 KiB frame: list links, state and
//!   order of each block head, and when a large block became free. Nothing is ever written
//!   into the blocks: hinted memory must stay untouched.
//! - `shard`: one buddy allocator: per-order free lists split by hint class, a cache of
//!   small freed blocks, and lock-free counters (`freed`/`bound`, as in the seed);
//!   `shard::reservation` keeps the regions reserved for capture requests.
//! - `pool`: shard choice by CPU, balancing through a shared pool of whole free chunks and
//!   by allocating from other shards, frees routed to the chunk's owner.
//! - `hint`: the hinter thread and its isolate / advise / return protocol.
//! - `capture`: the queue of waiting requests and the hand-off protocol.
//! - `local_cache`: [`LocalCache`], a caller-owned cache of free blocks in front of the
//!   shards, with no lock on its fast path.
//! - `stats`, `config`, `error`, `process_memory` (honest `Rss - LazyFree` readings), and
//!   `sync`, the facade that swaps `std` for `loom`.
//! - `global`: [`PoolAlloc`], the pool as a `#[global_allocator]`: small requests to a
//!   fallback allocator, routing of frees by address, lazy allocation-free set-up, a
//!   re-entrancy guard, in-place `realloc`, and `fork` handlers.
//! - `allocator_api` (feature `allocator-api2`, on by default): `allocator_api2::Allocator`
//!   for [`PagePool`] (so `&PagePool`) and [`PoolAlloc`], for `hashbrown` and
//!   `allocator_api2::vec::Vec`.
//!
//! Data flows one way: the adapter calls the pool, the pool picks a shard, the shard edits
//! the frame table; the hinter and capture hook into the shard through narrow functions.
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

#[cfg(all(feature = "allocator-api2", not(loom)))]
mod allocator_api;
mod capture;
mod config;
mod error;
mod frame_table;
#[cfg(not(loom))]
mod global;
mod hint;
mod local_cache;
#[allow(dead_code)] // a building block: the per-CPU caches that use it come next
mod percpu;
mod pool;
mod process_memory;
mod region;
mod shard;
mod stats;
mod sync;

pub use config::{AllocPolicy, Backing, DEFAULT_MAX_ORDER, HintMode, PoolBuilder};
pub use error::{AllocError, BuildError, FreeError};
#[cfg(not(loom))]
pub use global::{DEFAULT_MIN_POOL_SIZE, GLOBAL_MAX_ORDER, PoolAlloc, PoolAllocStats};
#[doc(hidden)]
pub use hint::Advisor;
pub use local_cache::{DEFAULT_LOCAL_CACHE_BLOCKS, LocalCache};
pub use pool::{Block, HintReport, PagePool};
pub use process_memory::{ProcessMemory, minor_faults};
pub use stats::{CaptureStats, HintStats, OrderStats, Stats};

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
