//! The sharded pool: picks a shard, balances between shards, and owns the hinter thread.
//!
//! [`PoolCore`] is the allocator without any thread or reference count, so it can live
//! inside a `static` (the global allocator); [`PagePool`] wraps it in an `Arc` for the
//! hinter thread and adds the public API.
//!
//! # Shard choice and balancing
//! An allocation locks the shard of the CPU it runs on (`sched_getcpu() % shards`, a hint:
//! the thread may move, which costs only locality). If that shard has no fitting block it
//! takes a whole chunk from the shared pool; if that is empty too, it drains its own cache
//! of small blocks and then visits every other shard in turn, allocating there directly.
//! So an allocation fails only after it saw every shard. A block always belongs to the
//! shard that owns its chunk, whoever allocated it, and a free goes back there from any
//! thread. A shard that merges more than `keep_chunks` whole free chunks gives the surplus
//! back to the shared pool.
//!
//! Lock order: a shard, then the shared pool; a shard, then the capture queue, then a
//! request; a shard, then the hinter's wake lock. No code holds two per-CPU shards' locks
//! except [`PagePool::check_consistency`], which takes them in index order.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::capture::CaptureRegistry;
use crate::config::{HintConfig, PoolBuilder, Resolved};
use crate::error::{AllocError, BuildError, FreeError};
use crate::frame_table::{FrameIdx, FrameTable, FreeClass, Owner};
use crate::hint::{self, Advisor, HintCounters, HintSignal, HintTarget};
use crate::region::{MetaArray, Region};
use crate::shard::{
    AuditCounts, Env, Isolation, Locked, PREFER_RESIDENT, PREFER_ZERO, Shard, ShardId,
};
use crate::stats::Stats;
use crate::sync::Ordering;
use crate::{FRAME_SHIFT, FRAME_SIZE};

/// Unique pool ids, so a [`Block`] from another pool is recognised.
static NEXT_POOL_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

// === impl PoolCore ===

/// The allocator proper: region, frame table, shards, capture queue, hint signal.
pub(crate) struct PoolCore {
    id: u32,
    /// Unmapped on drop only when no block is allocated: see `impl Drop for PoolCore`.
    region: std::mem::ManuallyDrop<Region>,
    table: FrameTable,
    shards: MetaArray<CachePadded<Shard>>,
    shared: CachePadded<Shard>,
    pub(crate) capture: CaptureRegistry,
    pub(crate) signal: HintSignal,
    pub(crate) hint_counters: HintCounters,
    advisor: &'static dyn Advisor,
    pub(crate) config: PoolBuilder,
    pub(crate) resolved: Resolved,
    /// Blocks each order's small-block cache may hold.
    cache_limits: [u32; crate::shard::ORDERS],
    /// Each live `LocalCache`'s count of the frames it holds (counted as allocated by the
    /// shards), for `stats()`.
    pub(crate) local_caches: crate::sync::Mutex<Vec<crate::sync::Arc<crate::sync::AtomicU64>>>,
}

impl PoolCore {
    /// Sets up a pool. Allocates nothing through the global allocator when the backing is
    /// `Mmap`: region, frame table and shards all come from `mmap`.
    pub(crate) fn new(config: &PoolBuilder) -> Result<Self, BuildError> {
        let resolved = config.resolve()?;
        let chunk = FRAME_SIZE << resolved.max_order;
        let region = Region::new(resolved.capacity, chunk, config.backing, config.huge_pages)
            .map_err(BuildError::Map)?;
        let table = FrameTable::new(resolved.chunks, resolved.max_order, config.backing)
            .map_err(BuildError::Map)?;
        let shards = MetaArray::new(resolved.shards, config.backing, false, |i| {
            CachePadded::new(Shard::new(ShardId::Local(i), 0, resolved.max_order))
        })
        .map_err(BuildError::Map)?;
        let advisor: &'static dyn Advisor = match (config.hint.advisor, region.is_mapped()) {
            (Some(advisor), _) => advisor,
            (None, true) => &hint::OS_ADVISOR,
            (None, false) => &hint::HEAP_ADVISOR,
        };
        Ok(Self {
            id: NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            shared: CachePadded::new(Shard::new(
                ShardId::Shared,
                resolved.chunks,
                resolved.max_order,
            )),
            region: std::mem::ManuallyDrop::new(region),
            table,
            shards,
            capture: CaptureRegistry::new(config.capture, resolved.capture_min_order),
            signal: HintSignal::new(config.hint.high_water),
            hint_counters: HintCounters::default(),
            advisor,
            config: *config,
            resolved,
            cache_limits: cache_limits(config.cache_blocks, resolved.max_order),
            local_caches: crate::sync::Mutex::new(Vec::new()),
        })
    }

    #[inline]
    pub(crate) fn env(&self) -> Env<'_> {
        Env {
            table: &self.table,
            shared: &self.shared,
            capture: &self.capture,
            hint: &self.signal,
            policy: self.config.policy,
            max_order: self.resolved.max_order,
            hint_min_order: self.resolved.hint_min_order,
            cache_limits: &self.cache_limits,
            keep_chunks: self.config.keep_chunks,
        }
    }

    #[inline]
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    #[inline]
    pub(crate) fn table(&self) -> &FrameTable {
        &self.table
    }

    #[inline]
    pub(crate) fn max_order(&self) -> u8 {
        self.resolved.max_order
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard for the calling thread.
    #[inline]
    fn home_shard(&self) -> usize {
        let n = self.shards.len();
        if n == 1 {
            return 0;
        }
        crate::sync::current_cpu() % n
    }

    /// The shard that owns a chunk.
    #[inline]
    fn shard_of(&self, owner: Owner) -> &Shard {
        match owner {
            Owner::Shard(i) => &self.shards[i],
            Owner::Shared => &self.shared,
        }
    }

    #[inline]
    pub(crate) fn frame_ptr(&self, idx: FrameIdx) -> NonNull<u8> {
        // SAFETY: every frame index the pool hands around is below `table.len()`, so the
        // offset stays inside the region.
        unsafe { self.region.base().add((idx.0 as usize) << FRAME_SHIFT) }
    }

    /// The frame a block pointer starts at.
    #[inline]
    pub(crate) fn frame_of(&self, ptr: *const u8) -> Result<FrameIdx, FreeError> {
        let offset = self.region.offset_of(ptr).ok_or(FreeError::OutsideRegion)?;
        if offset & (FRAME_SIZE - 1) != 0 {
            return Err(FreeError::NotBlockStart);
        }
        Ok(FrameIdx((offset >> FRAME_SHIFT) as u32))
    }

    /// Whether `ptr` lies inside the region.
    #[inline]
    pub(crate) fn contains(&self, ptr: *const u8) -> bool {
        self.region.offset_of(ptr).is_some()
    }

    // --- allocation --------------------------------------------------------------------

    /// Allocates a block of `order` on `shard` (or the caller's shard), balancing as the
    /// module docs describe. Returns the block and the class it had while free.
    pub(crate) fn alloc_frame(
        &self,
        order: u8,
        zero: bool,
        shard: Option<usize>,
    ) -> Result<(FrameIdx, FreeClass), AllocError> {
        if order > self.resolved.max_order {
            return Err(AllocError::OrderTooLarge {
                order,
                max_order: self.resolved.max_order,
            });
        }
        let prefs = if zero && self.config.policy == crate::AllocPolicy::PreferUnhinted {
            &PREFER_ZERO
        } else {
            &PREFER_RESIDENT
        };
        let home = shard.map_or_else(|| self.home_shard(), |s| s % self.shards.len());
        let env = self.env();
        if let Some(found) = self.shards[home].lock(&env).alloc(order, prefs) {
            return Ok(found);
        }
        self.alloc_slow(home, order, prefs, &env)
    }

    /// Every shard in turn, starting at home, each with its small-block cache merged back.
    #[cold]
    fn alloc_slow(
        &self,
        home: usize,
        order: u8,
        prefs: &[FreeClass; crate::frame_table::CLASSES],
        env: &Env<'_>,
    ) -> Result<(FrameIdx, FreeClass), AllocError> {
        let n = self.shards.len();
        for i in 0..n {
            let mut shard = self.shards[(home + i) % n].lock(env);
            shard.drain_cache(0);
            if let Some(found) = shard.alloc_thorough(order, prefs) {
                return Ok(found);
            }
        }
        // The shared pool holds pieces smaller than a chunk only when capture took part of
        // a chunk that the hinter returned there: they are free memory too.
        if let Some(found) = self.shared.lock(env).alloc_thorough(order, prefs) {
            return Ok(found);
        }
        Err(AllocError::Exhausted { order })
    }

    /// Allocates one block of `order` and, under the same lock of the caller's shard, up to
    /// `want - 1` more while that shard has them at hand, passing each extra to `extra`.
    /// For [`LocalCache`](crate::LocalCache) refills.
    pub(crate) fn alloc_batch(
        &self,
        order: u8,
        want: usize,
        mut extra: impl FnMut(FrameIdx),
    ) -> Result<FrameIdx, AllocError> {
        let home = self.home_shard();
        let env = self.env();
        {
            let mut shard = self.shards[home].lock(&env);
            if let Some((first, _)) = shard.alloc(order, &PREFER_RESIDENT) {
                for _ in 1..want {
                    let Some((idx, _)) = shard.alloc(order, &PREFER_RESIDENT) else {
                        break;
                    };
                    extra(idx);
                }
                return Ok(first);
            }
        }
        self.alloc_slow(home, order, &PREFER_RESIDENT, &env)
            .map(|(idx, _)| idx)
    }

    /// Frees allocated blocks of `order`, taking each owner's lock once per run of blocks
    /// it owns. For [`LocalCache`](crate::LocalCache) spills; the blocks are not checked.
    pub(crate) fn free_batch(&self, blocks: impl Iterator<Item = FrameIdx>, order: u8) {
        let env = self.env();
        let mut held: Option<(Owner, Locked<'_>)> = None;
        for idx in blocks {
            // A chunk only changes owner under its owner's lock: while we hold that lock,
            // the owner the table names stays true.
            let owner = self.table.owner(idx.chunk(self.resolved.max_order));
            if held.as_ref().is_none_or(|(o, _)| *o != owner) {
                drop(held.take()); // unlock before locking another shard
                held = Some(self.lock_owner(idx, &env));
            }
            let (_, shard) = held.as_mut().expect("locked above");
            debug_assert_eq!(
                self.table.frame(idx).get(),
                (crate::frame_table::FrameState::LocalCached, order),
                "a LocalCache gives back only blocks it holds"
            );
            shard.free(idx, order);
        }
    }

    /// Allocates, zeroing the block unless it is known to be zero already.
    pub(crate) fn alloc_block(
        &self,
        order: u8,
        zero: bool,
        shard: Option<usize>,
    ) -> Result<Block, AllocError> {
        let (idx, class) = self.alloc_frame(order, zero, shard)?;
        let block = Block {
            ptr: self.frame_ptr(idx),
            order,
            pool: self.id,
        };
        if zero && class != FreeClass::Zero {
            // SAFETY: the block was just handed to us: `len` bytes inside the region that
            // nobody else may touch.
            unsafe { std::ptr::write_bytes(block.ptr.as_ptr(), 0, block.len()) };
        }
        Ok(block)
    }

    // --- free and resize ---------------------------------------------------------------

    /// Runs `f` on the locked shard that owns `idx`'s chunk.
    #[inline]
    fn with_owner<R>(&self, idx: FrameIdx, f: impl FnOnce(&mut Locked<'_>) -> R) -> R {
        let env = self.env();
        let (_, mut shard) = self.lock_owner(idx, &env);
        f(&mut shard)
    }

    /// Locks the shard that owns `idx`'s chunk; returns it with its name.
    #[inline(always)]
    fn lock_owner<'a>(&'a self, idx: FrameIdx, env: &'a Env<'a>) -> (Owner, Locked<'a>) {
        let chunk = idx.chunk(self.resolved.max_order);
        loop {
            let owner = self.table.owner(chunk);
            let shard = self.shard_of(owner).lock(env);
            // Whole free chunks move between shards; re-check under the lock.
            if self.table.owner(chunk) == owner {
                return (owner, shard);
            }
        }
    }

    /// Frees the block starting at `idx`, checking it is allocated (with `order`, if given).
    pub(crate) fn free_frame(&self, idx: FrameIdx, order: Option<u8>) -> Result<u8, FreeError> {
        self.with_owner(idx, |shard| {
            let actual = shard.allocated_order(idx)?;
            if let Some(given) = order
                && given != actual
            {
                return Err(FreeError::WrongOrder { given, actual });
            }
            shard.free(idx, actual);
            Ok(actual)
        })
    }

    /// The order of the allocated block starting at `ptr`.
    pub(crate) fn order_of(&self, ptr: *const u8) -> Result<u8, FreeError> {
        let idx = self.frame_of(ptr)?;
        self.with_owner(idx, |shard| shard.allocated_order(idx))
    }

    /// Grows the allocated block at `idx` from `from` to `to` in place, if its buddies are free.
    pub(crate) fn grow_frame(&self, idx: FrameIdx, from: u8, to: u8) -> bool {
        to <= self.resolved.max_order && self.with_owner(idx, |shard| shard.grow(idx, from, to))
    }

    /// Shrinks the allocated block at `idx` from `from` to `to`, freeing the rest.
    pub(crate) fn shrink_frame(&self, idx: FrameIdx, from: u8, to: u8) {
        self.with_owner(idx, |shard| shard.shrink(idx, from, to));
    }

    /// Merges every shard's small-block cache back into its buddy lists.
    pub(crate) fn drain_caches(&self) {
        let env = self.env();
        for shard in self.shards.iter() {
            shard.lock(&env).drain_cache(0);
        }
    }

    // --- capture -----------------------------------------------------------------------

    #[inline]
    pub(crate) fn block_at(&self, idx: FrameIdx, order: u8) -> Block {
        Block {
            ptr: self.frame_ptr(idx),
            order,
            pool: self.id,
        }
    }

    /// Reserves for `request` the region of its order with the most free frames among the
    /// candidates of every shard (see `shard::reservation`). Returns the shard holding it.
    fn reserve_region(&self, request: &crate::capture::Request) -> Option<usize> {
        if !self.config.capture_reserve {
            return None;
        }
        let (order, ticket) = (request.order(), request.ticket());
        let env = self.env();
        let mut best: Option<(u32, usize, FrameIdx)> = None;
        for (i, shard) in self.shards.iter().enumerate() {
            let candidate = shard.lock(&env).reservation_candidate(order);
            if let Some((start, free)) = candidate
                && best.is_none_or(|(most, ..)| free > most)
            {
                best = Some((free, i, start));
            }
        }
        let (_, shard, start) = best?;
        // Pieces may have moved since the look: `reserve` checks the region again.
        if !self.shards[shard].lock(&env).reserve(start, order, ticket) {
            return None;
        }
        self.capture
            .counters
            .reservations
            .fetch_add(1, Ordering::Relaxed);
        Some(shard)
    }

    /// Ends a wait: withdraws the request unless it was `filled`, then ends the reservation
    /// `reserve_region` made, if it still stands. Withdrawing first means no free can hand
    /// the request a block any more when its region goes back. Returns the block it got.
    fn finish_wait(
        &self,
        request: &crate::sync::Arc<crate::capture::Request>,
        reserved: Option<usize>,
        filled: Option<FrameIdx>,
    ) -> Option<FrameIdx> {
        let outcome = filled.or_else(|| self.capture.withdraw(request));
        if let Some(shard) = reserved {
            self.shards[shard]
                .lock(&self.env())
                .unreserve(request.ticket());
        }
        outcome
    }

    /// Publishes a request, then tries every shard once more (see `capture`'s protocol).
    fn publish_and_recheck(
        &self,
        order: u8,
    ) -> (crate::sync::Arc<crate::capture::Request>, Option<Block>) {
        let request = self.capture.publish(order);
        // Cached small blocks may merge into what we wait for: merge them now, under
        // capture, so any block they form is handed straight to a waiter.
        self.drain_caches();
        let block = match self.alloc_frame(order, false, None) {
            Ok((idx, _)) => {
                if let Some(extra) = self.capture.withdraw(&request) {
                    // A block arrived between publish and re-check: give it back.
                    let _ = self.free_frame(extra, Some(order));
                }
                Some(self.block_at(idx, order))
            }
            Err(_) => None,
        };
        (request, block)
    }

    pub(crate) fn alloc_wait(&self, order: u8, timeout: Duration) -> Result<Block, AllocError> {
        match self.alloc_block(order, false, None) {
            Err(AllocError::Exhausted { .. }) if order >= self.resolved.capture_min_order => {}
            other => return other,
        }
        let deadline = Instant::now().checked_add(timeout);
        if order < self.capture.min_order() {
            return self.poll_until(order, deadline);
        }
        let (request, block) = self.publish_and_recheck(order);
        if let Some(block) = block {
            return Ok(block);
        }
        self.capture.counters.waits.fetch_add(1, Ordering::Relaxed);
        let reserved = self.reserve_region(&request);
        let filled = self.capture.wait(&request, deadline);
        match self.finish_wait(&request, reserved, filled) {
            // Handed over, perhaps just at the deadline: it is ours.
            Some(idx) => Ok(self.block_at(idx, order)),
            None => {
                self.capture
                    .counters
                    .timeouts
                    .fetch_add(1, Ordering::Relaxed);
                Err(AllocError::Timeout { order })
            }
        }
    }

    /// Capture switched off: retry with backoff until the deadline, as a caller without
    /// capture would. The baseline that capture is measured against.
    fn poll_until(&self, order: u8, deadline: Option<Instant>) -> Result<Block, AllocError> {
        self.capture.counters.waits.fetch_add(1, Ordering::Relaxed);
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            if let Ok(block) = self.alloc_block(order, false, None) {
                return Ok(block);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.capture
                    .counters
                    .timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Err(AllocError::Timeout { order });
            }
            if backoff.is_completed() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                backoff.snooze();
            }
        }
    }

    pub(crate) fn alloc_with_reclaim(
        &self,
        order: u8,
        mut reclaim: impl FnMut() -> bool,
    ) -> Result<Block, AllocError> {
        match self.alloc_block(order, false, None) {
            Err(AllocError::Exhausted { .. }) => {}
            other => return other,
        }
        let mut rounds = 0u32;
        if order < self.capture.min_order() {
            // Too small to capture: reclaim and retry plainly.
            loop {
                if !reclaim() {
                    return Err(AllocError::ReclaimFailed { order, rounds });
                }
                rounds += 1;
                self.capture
                    .counters
                    .reclaim_rounds
                    .fetch_add(1, Ordering::Relaxed);
                if let Ok(block) = self.alloc_block(order, false, None) {
                    return Ok(block);
                }
            }
        }
        let (request, block) = self.publish_and_recheck(order);
        if let Some(block) = block {
            return Ok(block);
        }
        let reserved = self.reserve_region(&request);
        let filled = loop {
            let more = reclaim();
            if more {
                rounds += 1;
                self.capture
                    .counters
                    .reclaim_rounds
                    .fetch_add(1, Ordering::Relaxed);
            }
            // Frees inside the callback may have been captured for us already.
            let filled = self.capture.wait(&request, Some(Instant::now()));
            if filled.is_some() || !more {
                break filled;
            }
        };
        if let Some(idx) = self.finish_wait(&request, reserved, filled) {
            return Ok(self.block_at(idx, order));
        }
        // One last look: a block may have formed while no longer registered.
        self.alloc_block(order, false, None)
            .map_err(|_| AllocError::ReclaimFailed { order, rounds })
    }

    // --- stats and audit ---------------------------------------------------------------

    /// All shards, the shared pool last.
    pub(crate) fn all_shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards
            .iter()
            .map(|s| &**s)
            .chain(std::iter::once(&*self.shared))
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats::collect(self)
    }

    /// Locks every shard and checks lists, frame table and counters against each other.
    pub(crate) fn check_consistency(&self) -> Result<(), String> {
        let env = self.env();
        let locked: Vec<Locked<'_>> = self.all_shards().map(|s| s.lock(&env)).collect();
        let max = self.resolved.max_order;
        let mut seen = AuditCounts::default();
        for shard in &locked {
            shard.audit(&mut seen)?;
        }
        // Walk every chunk that was ever handed out, block by block.
        let mut allocated = vec![0u64; max as usize + 1];
        let mut isolated = vec![0u64; max as usize + 1];
        let mut walked_free = vec![0u64; max as usize + 1];
        for chunk in 0..seen.first_fresh_chunk {
            let mut idx = crate::frame_table::ChunkIdx(chunk).head(max);
            let end = idx.plus(1 << max);
            while idx < end {
                let (state, order) = self.table.frame(idx).get();
                use crate::frame_table::FrameState as S;
                match state {
                    S::Interior => {
                        return Err(format!(
                            "frame {} should start a block but is interior",
                            idx.0
                        ));
                    }
                    // A `LocalCache`'s blocks are allocated as far as the shards know.
                    S::Allocated | S::LocalCached => allocated[order as usize] += 1,
                    S::Isolated => isolated[order as usize] += 1,
                    S::Unhinted | S::Hinted | S::Zero | S::Cached => {
                        walked_free[order as usize] += 1
                    }
                }
                if idx.0 & ((1 << order) - 1) != 0 || order > max {
                    return Err(format!(
                        "block at frame {} has impossible order {order}",
                        idx.0
                    ));
                }
                idx = idx.plus(1 << order);
            }
        }
        for chunk in seen.first_fresh_chunk..self.table.chunks() {
            let head = crate::frame_table::ChunkIdx(chunk).head(max);
            if self.table.frame(head).get().0 != crate::frame_table::FrameState::Interior {
                return Err(format!("fresh chunk {chunk} has a written head"));
            }
        }
        let mut total_frames = 0u64;
        for order in 0..=max as usize {
            let listed: u64 = seen.free[order].iter().sum::<u64>() + seen.cached[order];
            let fresh = if order == max as usize {
                seen.fresh_chunks
            } else {
                0
            };
            if walked_free[order] + fresh != listed {
                return Err(format!(
                    "order {order}: the frame table holds {} free blocks, the lists {}",
                    walked_free[order] + fresh,
                    listed
                ));
            }
            let counted_alloc: u64 = self
                .all_shards()
                .map(|s| s.counters[order].allocated.load(Ordering::Acquire))
                .sum();
            if counted_alloc != allocated[order] {
                return Err(format!(
                    "order {order}: {} allocated blocks in the table, counters say {counted_alloc}",
                    allocated[order]
                ));
            }
            let counted_iso: u64 = self
                .all_shards()
                .map(|s| s.counters[order].in_flight.load(Ordering::Acquire))
                .sum();
            if counted_iso != isolated[order] {
                return Err(format!(
                    "order {order}: {} isolated blocks, counters say {counted_iso}",
                    isolated[order]
                ));
            }
            total_frames += (listed + allocated[order] + isolated[order]) << order;
        }
        if total_frames != self.table.len() as u64 {
            return Err(format!(
                "free + allocated + in-flight = {total_frames} frames, capacity is {}",
                self.table.len()
            ));
        }
        Ok(())
    }
}

/// `blocks` per order up to order 3, halving with each order above (at least one), none at
/// the maximum order: a shard caches at most about 9 MiB with the defaults.
fn cache_limits(blocks: u32, max_order: u8) -> [u32; crate::shard::ORDERS] {
    std::array::from_fn(|order| match order {
        _ if blocks == 0 || order >= max_order as usize => 0,
        0..=3 => blocks,
        _ => (blocks >> (order - 3)).max(1),
    })
}

impl Drop for PoolCore {
    fn drop(&mut self) {
        let allocated: u64 = self
            .all_shards()
            .flat_map(|s| s.counters.iter())
            .map(|c| c.allocated.load(Ordering::Acquire) + c.in_flight.load(Ordering::Acquire))
            .sum();
        if allocated == 0 {
            // SAFETY: dropped once, here, and nothing refers into the region any more: no
            // block is allocated, and the pool itself is going away.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.region) };
        }
        // Otherwise live `Block`s still point into the region. They are safe handles, so
        // their memory must stay valid: the region is leaked instead of unmapped.
    }
}

// === impl HintTarget for PoolCore ===

impl HintTarget for PoolCore {
    fn shard_count(&self) -> usize {
        self.shards.len() + 1
    }

    fn isolate(
        &self,
        shard: usize,
        cold_ms: Option<u32>,
        max_blocks: usize,
        budget_frames: &mut u64,
        out: &mut Vec<(FrameIdx, u8)>,
    ) -> Isolation {
        let env = self.env();
        let shard = self.shards.get(shard).map_or(&*self.shared, |s| &**s);
        let mut shard = shard.lock(&env);
        // Cached blocks are free memory too: merge them so they can be hinted.
        shard.drain_cache(0);
        shard.isolate(
            self.resolved.hint_min_order,
            cold_ms,
            max_blocks,
            budget_frames,
            out,
        )
    }

    fn return_isolated(
        &self,
        shard: usize,
        blocks: &[(FrameIdx, u8)],
        classes: &[Option<FreeClass>],
    ) {
        let env = self.env();
        let shard = self.shards.get(shard).map_or(&*self.shared, |s| &**s);
        let mut shard = shard.lock(&env);
        for (&(idx, order), &class) in blocks.iter().zip(classes) {
            shard.return_isolated(idx, order, class);
        }
    }

    fn frame_addr(&self, idx: FrameIdx) -> usize {
        self.frame_ptr(idx).as_ptr() as usize
    }

    fn config(&self) -> &HintConfig {
        &self.config.hint
    }

    fn min_order(&self) -> u8 {
        self.resolved.hint_min_order
    }

    fn advisor(&self) -> &dyn Advisor {
        self.advisor
    }

    fn counters(&self) -> &HintCounters {
        &self.hint_counters
    }
}

// === impl Block ===

/// An allocated block: `4 KiB << order` bytes, aligned to its size.
///
/// A `Block` is an owned handle, like a `Box` without a destructor: give it back with
/// [`PagePool::free`]. Dropping it leaks the block (it stays allocated). To keep only a
/// pointer, use [`Block::into_raw`] and [`PagePool::free_raw`].
///
/// The contents of a new block are unspecified (old data, or zeros if the kernel reclaimed
/// a hinted page) unless it came from [`PagePool::alloc_zeroed`].
///
/// A block stays valid memory even if its pool is dropped first: a pool dropped with
/// blocks still allocated leaks its region rather than unmapping it.
#[derive(Debug)]
#[must_use = "a Block that is dropped stays allocated; free it with PagePool::free"]
pub struct Block {
    ptr: NonNull<u8>,
    order: u8,
    pool: u32,
}

// SAFETY: a Block is the unique owner of its bytes, like a Box<[u8]>.
unsafe impl Send for Block {}
// SAFETY: `&Block` only exposes the address and `&[u8]` reads.
unsafe impl Sync for Block {}

impl Block {
    /// First byte of the block.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// First byte of the block.
    #[inline]
    pub fn as_non_null(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Size in bytes: `4096 << order`.
    #[inline]
    pub fn len(&self) -> usize {
        FRAME_SIZE << self.order
    }

    /// Always false: a block is at least 4 KiB.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The block's order.
    #[inline]
    pub fn order(&self) -> u8 {
        self.order
    }

    /// The block's bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the block owns `len` bytes of mapped memory; mapped anonymous memory
        // always reads as initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The block's bytes, writable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    #[inline]
    pub(crate) fn pool_id(&self) -> u32 {
        self.pool
    }

    /// Gives up the handle and returns the pointer. Free it with [`PagePool::free_raw`],
    /// which finds the order in the frame table.
    #[inline]
    pub fn into_raw(self) -> NonNull<u8> {
        self.ptr
    }
}

// === impl PagePool ===

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
    core: crate::sync::Arc<PoolCore>,
    hinter: crate::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
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
        let pool = Self {
            core: crate::sync::Arc::new(PoolCore::new(config)?),
            hinter: crate::sync::Mutex::new(None),
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
        self.core.alloc_block(order, false, None)
    }

    /// Allocates a zeroed block, preferring blocks known to be zero (never touched, or
    /// returned with `MADV_DONTNEED`), which need no `memset`.
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_zeroed(&self, order: u8) -> Result<Block, AllocError> {
        self.core.alloc_block(order, true, None)
    }

    /// Allocates on a given shard (`shard % shard_count()`) instead of the current CPU's.
    /// Balancing still applies when that shard runs dry.
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_on(&self, shard: usize, order: u8) -> Result<Block, AllocError> {
        self.core.alloc_block(order, false, Some(shard))
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
        assert!(
            block.pool == self.core.id(),
            "pagepool: Block from pool {} freed to pool {}",
            block.pool,
            self.core.id()
        );
        let idx = self
            .core
            .frame_of(block.ptr.as_ptr())
            .expect("a Block of this pool lies in its region");
        if let Err(err) = self.core.free_frame(idx, Some(block.order)) {
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
    /// stale pointer whose address was handed out again: that frees someone else's block.
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
        Ok(Block {
            ptr,
            order,
            pool: self.core.id(),
        })
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
        if new_order <= block.order {
            return new_order == block.order;
        }
        let idx = self.core.frame_of(block.ptr.as_ptr()).expect("own block");
        let grown = self.core.grow_frame(idx, block.order, new_order);
        if grown {
            block.order = new_order;
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
            new_order <= block.order,
            "shrink to order {new_order} from order {}",
            block.order
        );
        let idx = self.core.frame_of(block.ptr.as_ptr()).expect("own block");
        self.core.shrink_frame(idx, block.order, new_order);
        block.order = new_order;
    }

    fn check_own(&self, block: &Block) {
        assert!(
            block.pool == self.core.id(),
            "pagepool: Block from pool {} used with pool {}",
            block.pool,
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
        self.core.alloc_wait(order, timeout)
    }

    /// Allocates, and when the pool is exhausted, calls `reclaim` to free memory the caller
    /// owns (a buffer manager evicting pages) until a block of `order` forms. While it runs,
    /// blocks that its frees, and frees by other threads, coalesce to `order` are captured
    /// for this caller. `reclaim` returns `false` when it can free nothing more.
    ///
    /// # Errors
    /// [`AllocError::ReclaimFailed`] when `reclaim` gave up and no block formed, or as
    /// [`alloc`](Self::alloc).
    pub fn alloc_with_reclaim(
        &self,
        order: u8,
        reclaim: impl FnMut() -> bool,
    ) -> Result<Block, AllocError> {
        self.core.alloc_with_reclaim(order, reclaim)
    }

    /// Hints every unhinted free block at or above the hint order now, whether cold or not,
    /// on the calling thread. For runtimes that drive hinting themselves.
    pub fn hint_now(&self) -> HintReport {
        let outcome = hint::run_pass(&*self.core, None, u64::MAX);
        HintReport {
            blocks: outcome.blocks,
            bytes: outcome.bytes,
            failures: outcome.failures,
        }
    }

    /// Starts the background hinter thread if it is not running (for pools built with
    /// `hint_thread(false)`, or after [`shutdown`](Self::shutdown) or a `fork`).
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start_hinter(&self) -> std::io::Result<()> {
        let mut slot = self.hinter.lock();
        if slot.is_some() {
            return Ok(());
        }
        // Requests a first pass too: anything freed before the thread listened deserves one.
        self.core.signal.start_listening();
        let core = self.core.clone();
        let handle = match spawn_hinter(move || hint::hinter_main(&*core, &core.signal)) {
            Ok(handle) => handle,
            Err(err) => {
                self.core.signal.stop();
                return Err(err);
            }
        };
        *slot = Some(handle);
        Ok(())
    }

    /// Stops the hinter thread and waits for it. Allocation keeps working; hinting then
    /// happens only through [`hint_now`](Self::hint_now). Also done by `Drop`.
    pub fn shutdown(&self) {
        let handle = self.hinter.lock().take();
        if let Some(handle) = handle {
            self.core.signal.stop();
            let _ = handle.join();
        }
    }

    /// Whether the hinter thread runs.
    pub fn hinter_running(&self) -> bool {
        self.hinter.lock().is_some()
    }

    /// A snapshot of the counters, read without locks.
    pub fn stats(&self) -> Stats {
        self.core.stats()
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

impl Drop for PagePool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Spawns the named hinter thread.
pub(crate) fn spawn_hinter(
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pagepool-hinter".into())
        .spawn(f)
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

/// What [`PagePool::hint_now`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HintReport {
    /// Blocks given back.
    pub blocks: u64,
    /// Bytes given back.
    pub bytes: u64,
    /// Blocks whose advice failed (they stay unhinted).
    pub failures: u64,
}
