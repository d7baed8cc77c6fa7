//! [`LocalCache`]: a caller-owned cache of free blocks, with no lock on its fast path.
//!
//! # Protocol
//! - Blocks in a cache are *allocated* as far as the shards know: no shard merges them,
//!   and `stats()` counts them in `allocated_bytes` and, separately, `local_cache_bytes`.
//! - Their frame entries say "held by a local cache", written by the owner without a lock.
//!   Nobody else writes the entry of a block that is not free, and readers under a shard
//!   lock treat both "allocated" and "held by a local cache" as "not free", so either value
//!   is right for them. A raw free of a cached block therefore fails with `AlreadyFree`.
//! - The borrow of the pool makes the pool outlive the cache; dropping the cache returns
//!   every block. A cache that is leaked (`mem::forget`) leaks its blocks, like any block.
//! - While a capture request waits, frees go straight to the pool, so they can coalesce.

use crate::error::AllocError;
use crate::frame_table::{FrameIdx, FrameState};
use crate::front::block::Block;
use crate::front::page_pool::PagePool;
use crate::sync::{Arc, AtomicU64, Ordering};

/// Blocks kept per order unless [`PagePool::local_cache_with`] says otherwise.
pub const DEFAULT_LOCAL_CACHE_BLOCKS: u32 = 16;

/// A cache of free blocks owned by one worker (a thread, a task, a JIT compiler instance).
///
/// Every [`PagePool::alloc`] and [`PagePool::free`] takes a shard lock: two atomic
/// read-modify-writes each, most of the cost of a repeated allocation. Linux keeps per-CPU
/// page lists for the same reason, and allocators like jemalloc keep per-thread caches. A
/// `LocalCache` keeps a few blocks of each order it has seen, hands them out and takes them
/// back with plain loads and stores, and goes to the pool only in batches. Its blocks count
/// as allocated in [`PagePool::stats`] (and, separately, as `local_cache_bytes`), and other
/// threads cannot use them until the cache is flushed or dropped.
///
/// Up to `blocks` blocks per order are kept for orders up to 3 (the kernel's costly order),
/// half as many for each order above, at least one. An empty order takes half its limit
/// from the pool under one lock; a full one gives half back the same way.
///
/// ```
/// use pagepool::PagePool;
///
/// let pool = PagePool::builder().capacity(64 << 20).hint_thread(false).build()?;
/// let mut cache = pool.local_cache();
/// let block = cache.alloc(0)?; // one shard lock to fill the cache, none after
/// cache.free(block);
/// let again = cache.alloc(0)?; // from the cache: no lock
/// cache.free(again);
/// drop(cache); // every cached block goes back to the pool
/// assert_eq!(pool.stats().allocated_bytes, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LocalCache<'pool> {
    pool: &'pool PagePool,
    /// Per order, the cached blocks.
    stacks: Box<[Stack]>,
    /// Frames held, for `held_bytes` and `stats()`: registered with the pool, written only
    /// by this cache (a load and a store, no read-modify-write).
    held: Arc<AtomicU64>,
    /// For a cache of a shared pool ([`PagePool::local_cache_shared`]): the `Arc` that
    /// `pool` points into, which keeps it alive as long as the cache. Dropped last.
    _owner: Option<std::sync::Arc<PagePool>>,
}

/// The cached blocks of one order, hottest last.
struct Stack {
    /// First frames; never longer than `limit` (room reserved up front).
    frames: Vec<u32>,
    limit: usize,
}

impl PagePool {
    /// A cache of free blocks for one worker, with [`DEFAULT_LOCAL_CACHE_BLOCKS`].
    pub fn local_cache(&self) -> LocalCache<'_> {
        self.local_cache_with(DEFAULT_LOCAL_CACHE_BLOCKS)
    }

    /// A cache that keeps up to `blocks` blocks of each order up to 3 and half as many for
    /// each order above (at least one). `blocks == 0` caches nothing: every call goes to
    /// the pool.
    pub fn local_cache_with(&self, blocks: u32) -> LocalCache<'_> {
        LocalCache::new(self, blocks, None)
    }

    /// A cache of a shared pool, with [`DEFAULT_LOCAL_CACHE_BLOCKS`]: it holds an `Arc` of
    /// the pool instead of borrowing it, so it is `'static` and can live in a
    /// `thread_local!`, returning its blocks when the thread exits.
    ///
    /// ```
    /// use pagepool::{LocalCache, PagePool};
    /// use std::cell::RefCell;
    /// use std::sync::Arc;
    ///
    /// thread_local! {
    ///     // One cache per thread, of whichever pool the thread was given.
    ///     static CACHE: RefCell<Option<LocalCache<'static>>> = const { RefCell::new(None) };
    /// }
    ///
    /// let pool = Arc::new(PagePool::builder().capacity(64 << 20).build()?);
    /// let workers: Vec<_> = (0..2)
    ///     .map(|_| {
    ///         let pool = pool.clone();
    ///         std::thread::spawn(move || {
    ///             CACHE.set(Some(pool.local_cache_shared()));
    ///             for _ in 0..1000 {
    ///                 CACHE.with_borrow_mut(|cache| {
    ///                     let cache = cache.as_mut().expect("installed above");
    ///                     let block = cache.alloc(0).expect("room");
    ///                     cache.free(block);
    ///                 });
    ///             }
    ///         }) // the thread's cache returns its blocks as the thread exits
    ///     })
    ///     .collect();
    /// for worker in workers {
    ///     worker.join().unwrap();
    /// }
    /// assert_eq!(pool.stats().allocated_bytes, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn local_cache_shared(self: &std::sync::Arc<Self>) -> LocalCache<'static> {
        self.local_cache_shared_with(DEFAULT_LOCAL_CACHE_BLOCKS)
    }

    /// [`local_cache_shared`](Self::local_cache_shared) with `blocks` as in
    /// [`local_cache_with`](Self::local_cache_with).
    pub fn local_cache_shared_with(
        self: &std::sync::Arc<Self>,
        blocks: u32,
    ) -> LocalCache<'static> {
        let owner = self.clone();
        // SAFETY: the reference points into the `Arc` the cache keeps in `_owner`, dropped
        // after everything that uses it; the cache never hands the reference out.
        let pool: &'static PagePool = unsafe { &*std::sync::Arc::as_ptr(&owner) };
        LocalCache::new(pool, blocks, Some(owner))
    }
}

impl<'pool> LocalCache<'pool> {
    fn new(
        pool: &'pool PagePool,
        blocks: u32,
        owner: Option<std::sync::Arc<PagePool>>,
    ) -> LocalCache<'pool> {
        let stacks = (0..=pool.max_order())
            .map(|order| {
                let limit = if blocks == 0 {
                    0
                } else {
                    (blocks >> order.saturating_sub(3)).max(1) as usize
                };
                Stack {
                    frames: Vec::with_capacity(limit),
                    limit,
                }
            })
            .collect();
        let held = Arc::new(AtomicU64::new(0));
        pool.local_caches.lock().push(held.clone());
        LocalCache {
            pool,
            stacks,
            held,
            _owner: owner,
        }
    }
}

impl LocalCache<'_> {
    /// Allocates a block of `4 KiB << order` bytes, from the cache when it holds one.
    ///
    /// # Errors
    /// As [`PagePool::alloc`]; blocks held by other caches are not available.
    #[inline]
    pub fn alloc(&mut self, order: u8) -> Result<Block, AllocError> {
        let core = self.pool.core();
        let Some(stack) = self.stacks.get_mut(order as usize) else {
            return Err(AllocError::OrderTooLarge {
                order,
                max_order: core.max_order(),
            });
        };
        let idx = match stack.frames.pop() {
            Some(idx) => {
                let idx = FrameIdx(idx);
                let frame = core.table().frame(idx);
                debug_assert_eq!(frame.get(), (FrameState::LocalCached, order));
                frame.set(FrameState::Allocated, order);
                self.account(-(1i64 << order));
                idx
            }
            // The pool hands the refill's first block out already marked allocated.
            None => self.refill(order)?,
        };
        Ok(self.pool.block_at(idx, order))
    }

    /// Allocates a zeroed block. Cached blocks are not known to be zero, so this zeroes.
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_zeroed(&mut self, order: u8) -> Result<Block, AllocError> {
        let block = self.alloc(order)?;
        // SAFETY: a block just handed to us: `len` bytes of the region nobody else touches.
        unsafe { std::ptr::write_bytes(block.as_ptr(), 0, block.len()) };
        Ok(block)
    }

    /// Frees a block into the cache (to the pool when the cache is full of that order, in
    /// a batch, or while a capture request waits).
    ///
    /// # Panics
    /// If `block` was allocated by another pool, as [`PagePool::free`].
    #[inline]
    pub fn free(&mut self, block: Block) {
        let core = self.pool.core();
        let order = block.order();
        let o = order as usize;
        // A foreign block goes to `PagePool::free`, which panics before changing anything.
        if block.pool_id() != core.id() || self.stacks[o].limit == 0 || core.capture.has_waiters() {
            self.pool.free(block);
            return;
        }
        let idx = core
            .frame_of(block.as_ptr())
            .expect("a Block of this pool lies in its region");
        if self.stacks[o].frames.len() == self.stacks[o].limit {
            self.spill(order);
        }
        let frame = core.table().frame(idx);
        debug_assert_eq!(frame.get(), (FrameState::Allocated, order));
        frame.set(FrameState::LocalCached, order);
        // The cache owns the block now (a `Block` has no destructor: the handle just ends).
        self.stacks[o].frames.push(idx.0);
        self.account(1 << order);
    }

    /// Returns every cached block to the pool.
    pub fn flush(&mut self) {
        for order in 0..self.stacks.len() {
            self.give_back(order as u8, usize::MAX);
        }
    }

    /// Bytes of free blocks this cache holds.
    pub fn held_bytes(&self) -> usize {
        (self.held.load(Ordering::Relaxed) as usize) << crate::FRAME_SHIFT
    }

    /// Adds `frames` (negative: subtracts) to the count `stats()` reads.
    #[inline]
    fn account(&self, frames: i64) {
        let held = self.held.load(Ordering::Relaxed);
        self.held
            .store(held.wrapping_add(frames as u64), Ordering::Relaxed);
    }

    /// An empty order: takes half its limit (at least one) from the pool under one lock and
    /// returns one of them.
    #[cold]
    fn refill(&mut self, order: u8) -> Result<FrameIdx, AllocError> {
        let core = self.pool.core();
        let stack = &mut self.stacks[order as usize];
        let want = (stack.limit / 2).max(1);
        let first = core.alloc_batch(order, want, |idx| {
            core.table().frame(idx).set(FrameState::LocalCached, order);
            stack.frames.push(idx.0);
        })?;
        // The stack was empty: everything on it now came from this refill.
        let extra = (stack.frames.len() as i64) << order;
        self.account(extra);
        Ok(first)
    }

    /// A full order: gives the older half back.
    #[cold]
    fn spill(&mut self, order: u8) {
        let stack = &self.stacks[order as usize];
        let count = stack.frames.len() - stack.limit / 2;
        self.give_back(order, count);
    }

    /// Frees up to `count` of the oldest cached blocks of `order` to the pool.
    fn give_back(&mut self, order: u8, count: usize) {
        let core = self.pool.core();
        let stack = &mut self.stacks[order as usize];
        let count = count.min(stack.frames.len());
        if count == 0 {
            return;
        }
        // The bottom of the stack holds the blocks freed longest ago.
        core.free_batch(stack.frames.drain(..count).map(FrameIdx), order);
        self.account(-((count as i64) << order));
    }
}

impl Drop for LocalCache<'_> {
    fn drop(&mut self) {
        self.flush();
        let mut caches = self.pool.local_caches.lock();
        if let Some(at) = caches.iter().position(|held| Arc::ptr_eq(held, &self.held)) {
            caches.swap_remove(at);
        }
    }
}

impl std::fmt::Debug for LocalCache<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("held_bytes", &self.held_bytes())
            .finish_non_exhaustive()
    }
}
