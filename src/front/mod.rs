//! Layer 6: the front ends, the ways a program reaches the pool.
//!
//! - [`page_pool`]: [`PagePool`], the public API over a shared pool core, and [`Block`].
//! - [`guard`]: blocks that free themselves on drop (borrowing the pool, or sharing it).
//! - [`alloc_async`]: capture for async code, a future woken by the free that completes
//!   the block.
//! - [`local_cache`]: [`LocalCache`], a caller-owned cache of free blocks with no lock.
//! - [`global`]: [`PoolAlloc`], the pool and its small-object layer as a
//!   `#[global_allocator]`, with direct mappings for the largest requests.
//! - [`pressure`]: watching for memory pressure ([`PagePool::watch_pressure`]).
//! - `allocator_api` (feature `allocator-api2`): `allocator_api2::Allocator` for both.
//!
//! May call: `slab`, `pool` and everything below them. Nothing below calls a front end.

pub(crate) mod alloc_async;
#[cfg(all(feature = "allocator-api2", not(loom)))]
mod allocator_api;
pub(crate) mod block;
#[cfg(not(loom))]
pub(crate) mod global;
pub(crate) mod guard;
pub(crate) mod local_cache;
pub(crate) mod page_pool;
pub(crate) mod pressure;

pub use block::Block;
pub use page_pool::PagePool;
