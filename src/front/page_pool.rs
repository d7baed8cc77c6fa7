//! [`PagePool`]: the public face of the pool.

use std::ptr::NonNull;
use std::time::Duration;

use crate::config::PoolBuilder;
use crate::error::{AllocError, BuildError, FreeError};
use crate::frame_table::{FrameIdx, FreeClass};
use crate::front::block::Block;
use crate::pool::evict::{Advice, BatchError};
use crate::pool::registry::registry;
use crate::pool::release::HintReport;
use crate::pool::{PoolCore, Stats};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering};

/// A sharded, concurrent page pool. See the [crate docs](crate) for the design.
///
/// # Example
/// ```
/// let pool = pagepool::PagePool::builder().capacity(64 << 20).build()?;
/// let mut block = pool.alloc(2)?; // 16 KiB
/// block.as_mut_slice()[0] = 42;
/// assert_eq!(block.len(), 16 << 10);
/// pool.free(block);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PagePool {
    /// Boxed: the process's registry of pools knows it by address.
    core: Box<PoolCore>,
    /// Each live `LocalCache`'s count of the frames it holds (counted as allocated by the
    /// shards), for `stats()`.
    pub(crate) local_caches: Mutex<Vec<Arc<AtomicU64>>>,
}

impl std::fmt::Debug for PagePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagePool")
            .field("capacity", &self.capacity())
            .field("max_order", &self.max_order())
            .field("shards", &self.shard_count())
            .finish_non_exhaustive()
    }
}

impl PagePool {
    /// A builder with the default configuration.
    pub const fn builder() -> PoolBuilder {
        PoolBuilder::new()
    }

    /// A pool with the default configuration: capacity equal to physical memory (reserved,
    /// not committed), 4 MiB chunks, one shard per CPU, hinter thread on.
    pub fn new() -> Result<Self, BuildError> {
        PoolBuilder::new().build()
    }

    pub(crate) fn from_builder(config: &PoolBuilder) -> Result<Self, BuildError> {
        let core = Box::new(PoolCore::new(config)?);
        // SAFETY: the box keeps the core at one address; `Drop` leaves before freeing it.
        unsafe { registry().join(&core) };
        let pool = Self {
            core,
            local_caches: Mutex::new(Vec::new()),
        };
        if config.hint.thread {
            pool.start_hinter().map_err(BuildError::SpawnHinter)?;
        }
        Ok(pool)
    }

    #[inline]
    pub(crate) fn core(&self) -> &PoolCore {
        &self.core
    }

    /// Bytes of block memory.
    pub fn capacity(&self) -> usize {
        self.core.resolved.capacity
    }

    /// The largest order.
    pub fn max_order(&self) -> u8 {
        self.core.max_order()
    }

    /// Number of per-CPU shards.
    pub fn shard_count(&self) -> usize {
        self.core.shard_count()
    }

    /// Whether `ptr` points into this pool's region.
    pub fn contains(&self, ptr: *const u8) -> bool {
        self.core.contains(ptr)
    }

    /// Allocates a block of `4 KiB << order` bytes.
    ///
    /// # Errors
    /// [`AllocError::OrderTooLarge`] above the maximum order; [`AllocError::Exhausted`]
    /// when no shard holds a free block of this order or larger outside the regions
    /// reserved by waiting [`alloc_wait`](Self::alloc_wait) requests.
    #[inline]
    pub fn alloc(&self, order: u8) -> Result<Block, AllocError> {
        // The `Result` is built here, in the caller: the cache hit comes back in two
        // registers (see `alloc_cached_block`) instead of through memory.
        match self.alloc_cached_block(order) {
            Some(block) => Ok(block),
            None => self.alloc_uncached(order),
        }
    }

    /// The fast path of [`alloc`](Self::alloc): a block from this CPU's cache. Returns an
    /// `Option<Block>`, which is two words and travels in registers; a `Result<Block,
    /// AllocError>` is returned through memory, and a caller moving the block on (into a
    /// `Vec`, a struct) reads it back with one 16-byte load that the CPU cannot forward
    /// from the callee's two 8-byte stores: about 10 ns of stall per allocation, measured
    /// on AMD Zen.
    #[inline(never)]
    fn alloc_cached_block(&self, order: u8) -> Option<Block> {
        match self.core.alloc_cached_fast(order) {
            Some(idx) => Some(self.block_at(idx, order)),
            None => self.alloc_cached_block_slow(order),
        }
    }

    /// [`alloc_cached_block`](Self::alloc_cached_block) past its fast path (an empty
    /// stack, the portable mode, ...).
    #[cold]
    #[inline(never)]
    fn alloc_cached_block_slow(&self, order: u8) -> Option<Block> {
        let (idx, _) = self.core.alloc_cached(order)?;
        Some(self.block_at(idx, order))
    }

    /// The rest of [`alloc`](Self::alloc) when the cache had nothing (it already tried to
    /// refill): the shards.
    #[cold]
    fn alloc_uncached(&self, order: u8) -> Result<Block, AllocError> {
        let (idx, _) = self.core.alloc_from_shards(order, false, None)?;
        Ok(self.block_at(idx, order))
    }

    /// Allocates a zeroed block, preferring blocks known to be zero (never touched, or
    /// returned with `MADV_DONTNEED`), which need no `memset`.
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_zeroed(&self, order: u8) -> Result<Block, AllocError> {
        self.alloc_block(order, true, None)
    }

    /// Allocates on a given shard (`shard % shard_count()`) instead of the current CPU's.
    /// Balancing still applies when that shard runs dry.
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_on(&self, shard: usize, order: u8) -> Result<Block, AllocError> {
        self.alloc_block(order, false, Some(shard))
    }

    /// Allocates the smallest block that holds `bytes`.
    ///
    /// # Errors
    /// [`AllocError::UnsupportedLayout`] for zero bytes or more than any pool's largest
    /// block (`block_size(MAX_SUPPORTED_ORDER)`); [`AllocError::OrderTooLarge`] when the
    /// size needs an order above this pool's maximum; otherwise as [`alloc`](Self::alloc).
    pub fn alloc_bytes(&self, bytes: usize) -> Result<Block, AllocError> {
        match crate::order_for(bytes, 1) {
            Some(order) if bytes > 0 => self.alloc(order),
            _ => Err(AllocError::UnsupportedLayout {
                size: bytes,
                align: 1,
            }),
        }
    }

    /// Frees a block.
    ///
    /// # Panics
    /// If `block` was allocated by another pool. (Its memory is not this pool's to take;
    /// the panic happens before anything is changed.)
    #[inline]
    pub fn free(&self, block: Block) {
        // The slow paths take the core, not `self`: one register fewer to keep alive.
        let core = &*self.core;
        if block.pool_id() != core.id() {
            Self::free_foreign(core, block);
        }
        // A Block of this pool lies in its region.
        let idx = core.frame_of_own(block.as_ptr());
        let order = block.order();
        if core.free_cached_fast(idx, Some(order)).is_none() {
            Self::free_uncached(core, idx, order);
        }
    }

    #[cold]
    #[inline(never)]
    fn free_foreign(core: &PoolCore, block: Block) -> ! {
        panic!(
            "pagepool: Block from pool {} freed to pool {}",
            block.pool_id(),
            core.id()
        );
    }

    /// [`free`](Self::free) past its fast path (a full stack, the portable mode, ...).
    #[cold]
    #[inline(never)]
    fn free_uncached(core: &PoolCore, idx: FrameIdx, order: u8) {
        if let Err(err) = core.free_frame_slow(idx, Some(order)) {
            panic!(
                "pagepool: frame table disagrees with a live Block ({err}); memory was corrupted"
            );
        }
    }

    /// Frees a block by pointer, finding its order in the frame table. Returns the order.
    ///
    /// # Errors
    /// [`FreeError::OutsideRegion`], [`FreeError::NotBlockStart`] or
    /// [`FreeError::AlreadyFree`]; the pool is unchanged.
    ///
    /// # Safety
    /// `ptr` must come from [`Block::into_raw`] of a block of this pool that was not freed
    /// since, and no reference into the block may be used afterwards. The frame table
    /// catches foreign pointers, interior pointers and frees of free blocks, but not a
    /// stale pointer whose address was handed out again (that frees someone else's block),
    /// nor two threads freeing one block at the same time: the check of an allocated
    /// block takes no lock.
    pub unsafe fn free_raw(&self, ptr: NonNull<u8>) -> Result<u8, FreeError> {
        let idx = self.core.frame_of(ptr.as_ptr())?;
        self.core.free_frame(idx, None)
    }

    /// Like [`free_raw`](Self::free_raw), and also checks the caller's idea of the order.
    ///
    /// # Errors
    /// As `free_raw`, plus [`FreeError::WrongOrder`].
    ///
    /// # Safety
    /// As [`free_raw`](Self::free_raw).
    pub unsafe fn free_raw_order(&self, ptr: NonNull<u8>, order: u8) -> Result<(), FreeError> {
        let idx = self.core.frame_of(ptr.as_ptr())?;
        self.core.free_frame(idx, Some(order)).map(|_| ())
    }

    /// Frees many blocks at once and tells the kernel about them in as few system calls as
    /// it allows: one `process_madvise` per 1024 blocks where the kernel has it (Linux
    /// 6.13+), one `madvise` per block otherwise. For buffer managers that evict pages in
    /// batches. With [`Advice::DontNeed`](crate::Advice::DontNeed) the blocks go back
    /// known-zero (a later `alloc_zeroed` needs no memset); with `Free` they are hinted;
    /// with `Keep` they are freed like any other.
    ///
    /// # Errors
    /// A block of another pool refuses the whole batch before anything is freed; the
    /// blocks come back with the error. (Blocks of this pool are always allocated: a
    /// `Block` is their only handle.)
    ///
    /// ```
    /// use pagepool::{Advice, PagePool};
    /// let pool = PagePool::builder().capacity(64 << 20).hint_thread(false).build()?;
    /// let pages: Vec<_> = (0..64).map(|_| pool.alloc(0)).collect::<Result<_, _>>()?;
    /// let report = pool.free_batch(pages, Advice::DontNeed).map_err(|(e, _)| e)?;
    /// assert_eq!(report.blocks, 64);
    /// assert_eq!(pool.stats().allocated_bytes, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[allow(clippy::result_large_err)] // the blocks go back to the caller
    pub fn free_batch(
        &self,
        blocks: impl IntoIterator<Item = Block>,
        advice: Advice,
    ) -> Result<HintReport, (BatchError, Vec<Block>)> {
        let blocks: Vec<Block> = blocks.into_iter().collect();
        if let Some(index) = blocks.iter().position(|b| b.pool_id() != self.core.id()) {
            let error = BatchError {
                index,
                error: FreeError::OutsideRegion,
            };
            return Err((error, blocks));
        }
        let mut batch: Vec<(FrameIdx, Option<u8>)> = blocks
            .iter()
            .map(|b| (self.core.frame_of_own(b.as_ptr()), Some(b.order())))
            .collect();
        if let Err(error) = self.core.check_batch(&mut batch) {
            return Err((error, blocks));
        }
        let batch: Vec<(FrameIdx, u8)> = batch.iter().map(|&(i, o)| (i, o.unwrap_or(0))).collect();
        // The handles end here; the blocks are the pool's again.
        drop(blocks);
        Ok(self.core.free_advised(&batch, advice))
    }

    /// [`free_batch`](Self::free_batch) by pointer: the frame table knows each order.
    ///
    /// # Errors
    /// The first bad pointer (outside the region, not a block start, free, or named twice)
    /// and what is wrong with it; then nothing was freed.
    ///
    /// # Safety
    /// Each pointer must come from [`Block::into_raw`] of a live block of this pool, as for
    /// [`free_raw`](Self::free_raw), and no other thread may free them meanwhile.
    pub unsafe fn free_raw_batch(
        &self,
        blocks: &[NonNull<u8>],
        advice: Advice,
    ) -> Result<HintReport, BatchError> {
        let mut batch = Vec::with_capacity(blocks.len());
        for (index, ptr) in blocks.iter().enumerate() {
            let idx = self
                .core
                .frame_of(ptr.as_ptr())
                .map_err(|error| BatchError { index, error })?;
            batch.push((idx, None));
        }
        self.core.check_batch(&mut batch)?;
        let batch: Vec<(FrameIdx, u8)> = batch.iter().map(|&(i, o)| (i, o.unwrap_or(0))).collect();
        Ok(self.core.free_advised(&batch, advice))
    }

    /// Rebuilds a [`Block`] from a pointer of [`Block::into_raw`].
    ///
    /// # Errors
    /// As [`free_raw`](Self::free_raw), when `ptr` is not an allocated block of this pool.
    ///
    /// # Safety
    /// `ptr` must come from `into_raw` of a live block of this pool, and the returned
    /// handle must be the only one.
    pub unsafe fn block_from_raw(&self, ptr: NonNull<u8>) -> Result<Block, FreeError> {
        let order = self.core.order_of(ptr.as_ptr())?;
        Ok(Block::new(ptr, order, self.core.id()))
    }

    /// The order of the allocated block at `ptr`, from the frame table.
    ///
    /// # Errors
    /// As [`free_raw`](Self::free_raw).
    pub fn order_of(&self, ptr: *const u8) -> Result<u8, FreeError> {
        self.core.order_of(ptr)
    }

    /// Grows `block` to `new_order` in place if the buddies it needs are free; the block
    /// keeps its address and contents. Returns whether it grew.
    pub fn try_grow(&self, block: &mut Block, new_order: u8) -> bool {
        self.check_own(block);
        if new_order <= block.order() {
            return new_order == block.order();
        }
        let idx = self.core.frame_of(block.as_ptr()).expect("own block");
        let grown = self.core.grow_frame(idx, block.order(), new_order);
        if grown {
            block.set_order(new_order);
        }
        grown
    }

    /// Shrinks `block` to `new_order` in place, freeing its upper part.
    ///
    /// # Panics
    /// If `new_order` is larger than the block's order, or the block is from another pool.
    pub fn shrink(&self, block: &mut Block, new_order: u8) {
        self.check_own(block);
        assert!(
            new_order <= block.order(),
            "shrink to order {new_order} from order {}",
            block.order()
        );
        let idx = self.core.frame_of(block.as_ptr()).expect("own block");
        self.core.shrink_frame(idx, block.order(), new_order);
        block.set_order(new_order);
    }

    fn check_own(&self, block: &Block) {
        assert!(
            block.pool_id() == self.core.id(),
            "pagepool: Block from pool {} used with pool {}",
            block.pool_id(),
            self.core.id()
        );
    }

    /// Waits up to `timeout` for a block of `order`, capturing one as concurrent frees
    /// coalesce it. Orders below the capture minimum (default 3) never wait: they fail at
    /// once when the pool is exhausted. With capture switched off
    /// ([`PoolBuilder::capture`]), the request retries with backoff until the deadline
    /// instead, competing with every other allocation for the pieces.
    ///
    /// Waiters of one order are served first come, first served; a free that merges into a
    /// larger block than a waiter needs hands over the lower part and frees the rest.
    ///
    /// While it waits, the request reserves the aligned region of its order with the most
    /// free frames ([`PoolBuilder::capture_reserve`]): other allocations skip that region's
    /// free pieces, so the frees of its remaining blocks complete it for this request
    /// rather than feeding small allocations. The reservation ends when the call returns.
    ///
    /// # Errors
    /// [`AllocError::Timeout`] (nothing is leaked: a block handed over at the deadline is
    /// returned instead), or as [`alloc`](Self::alloc).
    pub fn alloc_wait(&self, order: u8, timeout: Duration) -> Result<Block, AllocError> {
        let idx = self.core.alloc_wait(order, timeout)?;
        Ok(self.block_at(idx, order))
    }

    /// Allocates, and when the pool is exhausted, calls `reclaim` to free memory the caller
    /// owns (a buffer manager evicting pages) until a block of `order` forms. While it runs,
    /// blocks that its frees, and frees by other threads, coalesce to `order` are captured
    /// for this caller. `reclaim` returns `false` when it can free nothing more.
    ///
    /// A callback that keeps returning `true` while the pool sees no free for
    /// [`RECLAIM_STALL_ROUNDS`](crate::RECLAIM_STALL_ROUNDS) calls in a row is taken to have
    /// nothing left, so a faulty callback cannot loop for ever. If `reclaim` panics, the
    /// panic propagates after the request and its reservation are undone (a block captured
    /// meanwhile is freed): the pool is as if the call had not been made.
    ///
    /// # Errors
    /// [`AllocError::ReclaimFailed`] (with the number of calls) when `reclaim` gave up or
    /// stalled and no block formed, or as [`alloc`](Self::alloc).
    pub fn alloc_with_reclaim(
        &self,
        order: u8,
        reclaim: impl FnMut() -> bool,
    ) -> Result<Block, AllocError> {
        let idx = self.core.alloc_with_reclaim(order, reclaim)?;
        Ok(self.block_at(idx, order))
    }

    /// Hints every unhinted free block at or above the hint order now, whether cold or not,
    /// on the calling thread. For runtimes that drive hinting themselves. Blocks in the
    /// per-CPU caches stay there, warm for their CPU (the hinter drains a CPU's cache once
    /// the CPU has been idle for `hint_delay`); [`release_idle`](Self::release_idle) takes
    /// them too.
    pub fn hint_now(&self) -> HintReport {
        self.core.hint_now()
    }

    /// Gives back every free byte it can, now: drains the per-CPU caches and the shards'
    /// caches (so what they hold merges), then hints every free block at or above the hint
    /// order with the pool's advice (`MADV_DONTNEED` under memory pressure), whatever its
    /// age. For a runtime after a burst, or an operator's "release idle memory now".
    /// Blocks held by [`LocalCache`](crate::LocalCache)s stay there.
    ///
    /// Whole free chunks (blocks of the largest order) also give back the pages of the
    /// pool's own metadata that described them (16 bytes per 4 KiB frame): after a burst,
    /// the process returns to about where it was before it.
    ///
    /// Under memory pressure it also drops blocks given back earlier with `MADV_FREE`
    /// (they count against a cgroup until the kernel reclaims them).
    ///
    /// Linux marks lazily freed pages in per-CPU batches; `release_idle` drains its CPU's
    /// (with `MADV_COLD` over a page of its own), so everything it gave back shows as
    /// `LazyFree` in `/proc/self/smaps_rollup` when it returns.
    ///
    /// Returns what was advised; to see what left the process, compare
    /// [`ProcessMemory`](crate::ProcessMemory) readings.
    pub fn release_idle(&self) -> HintReport {
        self.core.release_idle(self.core.hint_min_order())
    }

    /// Like [`release_idle`](Self::release_idle), and also gives back free blocks below the
    /// hint order, down to `min_order`, with `MADV_DONTNEED` (which splits transparent huge
    /// pages: a later use of such memory faults in 4 KiB pages).
    pub fn release_idle_down_to(&self, min_order: u8) -> HintReport {
        self.core.release_idle(min_order)
    }

    /// Asks the process's hinter thread to serve this pool (starting the thread if none
    /// runs in this process): for pools built with `hint_thread(false)`, or after
    /// [`shutdown`](Self::shutdown), or in a child after `fork`, where no thread runs until
    /// this is called. One thread serves every pool of the process that asked.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start_hinter(&self) -> std::io::Result<()> {
        registry().start_hinting(&self.core)
    }

    /// Stops hinting this pool, waiting for a pass on it to end (and for the thread to
    /// exit, if no other pool asks for hinting). Allocation keeps working; hinting then
    /// happens only through [`hint_now`](Self::hint_now). Also done by `Drop`.
    pub fn shutdown(&self) {
        registry().stop_hinting(&self.core);
    }

    /// Whether the hinter thread runs in this process and serves this pool.
    pub fn hinter_running(&self) -> bool {
        registry().hinting(&self.core)
    }

    /// A snapshot of the counters, read without locks.
    pub fn stats(&self) -> Stats {
        let mut stats = self.core.stats();
        let cached_frames: u64 = self
            .local_caches
            .lock()
            .iter()
            .map(|held| held.load(Ordering::Relaxed))
            .sum();
        stats.local_cache_bytes = (cached_frames << crate::FRAME_SHIFT).min(stats.allocated_bytes);
        stats
    }

    /// Locks every shard and checks the free lists, the frame table and the counters
    /// against each other, including `free + allocated + in-flight == capacity`. O(capacity
    /// in use); meant for tests and debugging.
    ///
    /// # Errors
    /// A description of the first inconsistency found.
    pub fn check_consistency(&self) -> Result<(), String> {
        self.core.check_consistency()
    }

    /// Merges the shards' small-block caches back into the buddy lists, so free memory is
    /// visible as large blocks (for example before [`hint_now`](Self::hint_now)). Blocks in
    /// [`LocalCache`](crate::LocalCache)s stay there: only their owners can flush them.
    pub fn drain_caches(&self) {
        self.core.drain_caches();
    }
}

impl PagePool {
    /// Allocates, zeroing the block unless it is known to be zero already.
    #[inline]
    pub(crate) fn alloc_block(
        &self,
        order: u8,
        zero: bool,
        shard: Option<usize>,
    ) -> Result<Block, AllocError> {
        let (idx, class) = self.core.alloc_frame(order, zero, shard)?;
        let block = self.block_at(idx, order);
        if zero && class != FreeClass::Zero {
            // SAFETY: the block was just handed to us: `len` bytes inside the region that
            // nobody else may touch.
            unsafe { std::ptr::write_bytes(block.as_ptr(), 0, block.len()) };
        }
        Ok(block)
    }

    /// The handle of the allocated block `(idx, order)`.
    #[inline]
    pub(crate) fn block_at(&self, idx: FrameIdx, order: u8) -> Block {
        Block::new(self.core.frame_ptr(idx), order, self.core.id())
    }
}

impl Drop for PagePool {
    fn drop(&mut self) {
        registry().leave(&self.core);
    }
}

impl PoolBuilder {
    /// Builds the pool.
    ///
    /// # Errors
    /// [`BuildError`] for an invalid configuration, or when the OS refuses the mapping.
    pub fn build(&self) -> Result<PagePool, BuildError> {
        PagePool::from_builder(self)
    }
}
