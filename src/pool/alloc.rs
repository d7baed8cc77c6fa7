//! Allocation, frees and in-place resize: the paths every front end takes.

use super::PoolCore;
use crate::error::{AllocError, FreeError};
use crate::frame_table::{FrameIdx, FrameState, FreeClass, Owner};
use crate::shard::{Env, Locked, PREFER_RESIDENT, PREFER_ZERO};

impl PoolCore {
    // --- allocation --------------------------------------------------------------------

    /// Allocates a block of `order` on `shard` (or the caller's shard), balancing as the
    /// module docs describe. Returns the block and the class it had while free.
    #[inline]
    pub(crate) fn alloc_frame(
        &self,
        order: u8,
        zero: bool,
        shard: Option<usize>,
    ) -> Result<(FrameIdx, FreeClass), AllocError> {
        // The fast path: this CPU's cache (not for a named shard, nor for zeroed memory of
        // the sizes that prefer known-zero blocks).
        if shard.is_none()
            && (!zero || order < self.resolved.hint_min_order)
            && let Some(found) = self.alloc_cached(order)
        {
            return Ok(found);
        }
        self.alloc_from_shards(order, zero, shard)
    }

    /// Allocates from the shards, without the per-CPU cache.
    #[inline(never)]
    pub(crate) fn alloc_from_shards(
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
        // Known-zero memory saves the memset but is not resident: every page faults on
        // first touch, which costs more than zeroing a resident small block, and taking
        // fresh memory for every small zeroed request would grow the footprint without
        // bound. So only blocks at or above the hint order (2 MiB: where a large, maybe
        // sparsely used allocation is worth leaving untouched, as glibc does with `mmap`
        // for large `calloc`s) prefer known-zero memory.
        let prefs = if zero
            && order >= self.resolved.hint_min_order
            && self.config.policy == crate::AllocPolicy::PreferUnhinted
        {
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
        if let Some(found) = self.alloc_any_shard(home, order, prefs, env) {
            return Ok(found);
        }
        // Blocks in per-CPU caches are free memory too: give them back before failing.
        // This CPU's first; the others' only once per clock tick (a few ms) in a pool that
        // keeps running dry, because draining another CPU stops its cache for a moment
        // (and, with restartable sequences, interrupts it).
        if self.cpu.is_some() {
            if self.drain_this_cpu_cache()
                && let Some(found) = self.alloc_any_shard(home, order, prefs, env)
            {
                return Ok(found);
            }
            if self.may_drain_for_exhaustion() {
                self.drain_cpu_caches();
                if let Some(found) = self.alloc_any_shard(home, order, prefs, env) {
                    return Ok(found);
                }
            }
        }
        Err(AllocError::Exhausted { order })
    }

    /// Every shard in turn, starting at home, each with its small-block cache merged back,
    /// then the shared pool.
    fn alloc_any_shard(
        &self,
        home: usize,
        order: u8,
        prefs: &[FreeClass; crate::frame_table::CLASSES],
        env: &Env<'_>,
    ) -> Option<(FrameIdx, FreeClass)> {
        let n = self.shards.len();
        for i in 0..n {
            let mut shard = self.shards[(home + i) % n].lock(env);
            shard.drain_cache(0);
            if let Some(found) = shard.alloc_thorough(order, prefs) {
                return Some(found);
            }
        }
        // The shared pool holds pieces smaller than a chunk only when capture took part of
        // a chunk that the hinter returned there: they are free memory too.
        self.shared.lock(env).alloc_thorough(order, prefs)
    }

    /// Whether an allocation about to fail may drain every CPU's cache: not if another one
    /// did during this tick of the coarse clock (always where the clock does not move: loom
    /// and Miri).
    fn may_drain_for_exhaustion(&self) -> bool {
        let now = crate::sync::now_ms();
        if now == 0 {
            return true;
        }
        let last = self
            .last_exhaustion_drain
            .load(crate::sync::Ordering::Relaxed);
        last != now
            && self
                .last_exhaustion_drain
                .compare_exchange(
                    last,
                    now,
                    crate::sync::Ordering::Relaxed,
                    crate::sync::Ordering::Relaxed,
                )
                .is_ok()
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
        self.free_batch_since(blocks, order, FrameState::LocalCached, None);
    }

    /// Frees allocated blocks, each as `(frame, order, class, free since)`, straight into
    /// the buddy lists, locking each owner once per run of blocks it owns.
    pub(super) fn free_each_as(
        &self,
        blocks: impl Iterator<Item = (FrameIdx, u8, FreeClass, u32)>,
    ) {
        let env = self.env();
        let mut held: Option<(Owner, Locked<'_>)> = None;
        for (idx, order, class, since) in blocks {
            let owner = self.table.owner(idx.chunk(self.resolved.max_order));
            if held.as_ref().is_none_or(|(o, _)| *o != owner) {
                if let Some((_, shard)) = held.take() {
                    self.unlock(shard);
                }
                held = Some(self.lock_owner(idx, &env));
            }
            let (_, shard) = held.as_mut().expect("locked above");
            debug_assert_eq!(self.table.frame(idx).get(), (FrameState::Allocated, order));
            shard.free_as(idx, order, class, since);
        }
        if let Some((_, shard)) = held {
            self.unlock(shard);
        }
    }

    /// Frees blocks of `order` whose entries say `state` (a cache held them), locking each
    /// owner once per run of blocks it owns. With `since`, they go straight to the buddy
    /// lists as free since then (out of a per-CPU cache: no second cache); without, through
    /// the shard's ordinary free.
    pub(super) fn free_batch_since(
        &self,
        blocks: impl Iterator<Item = FrameIdx>,
        order: u8,
        state: FrameState,
        since: impl Into<Option<u32>>,
    ) {
        let since = since.into();
        let env = self.env();
        let mut held: Option<(Owner, Locked<'_>)> = None;
        for idx in blocks {
            // A chunk only changes owner under its owner's lock: while we hold that lock,
            // the owner the table names stays true.
            let owner = self.table.owner(idx.chunk(self.resolved.max_order));
            if held.as_ref().is_none_or(|(o, _)| *o != owner) {
                if let Some((_, shard)) = held.take() {
                    self.unlock(shard); // before locking another shard
                }
                held = Some(self.lock_owner(idx, &env));
            }
            let (_, shard) = held.as_mut().expect("locked above");
            debug_assert_eq!(
                self.table.frame(idx).get(),
                (state, order),
                "a cache gives back only blocks it holds"
            );
            match since {
                Some(since) => shard.free_since(idx, order, since),
                None => shard.free(idx, order),
            }
        }
        if let Some((_, shard)) = held {
            self.unlock(shard);
        }
    }

    // --- free and resize ---------------------------------------------------------------

    /// Runs `f` on the locked shard that owns `idx`'s chunk.
    #[inline]
    fn with_owner<R>(&self, idx: FrameIdx, f: impl FnOnce(&mut Locked<'_>) -> R) -> R {
        let env = self.env();
        let (_, mut shard) = self.lock_owner(idx, &env);
        let result = f(&mut shard);
        self.unlock(shard);
        result
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
    #[inline]
    pub(crate) fn free_frame(&self, idx: FrameIdx, order: Option<u8>) -> Result<u8, FreeError> {
        match self.free_cached_fast(idx, order) {
            Some(actual) => Ok(actual),
            None => self.free_frame_slow(idx, order),
        }
    }

    /// [`free_frame`](Self::free_frame) past its fast path.
    #[cold]
    #[inline(never)]
    pub(crate) fn free_frame_slow(
        &self,
        idx: FrameIdx,
        order: Option<u8>,
    ) -> Result<u8, FreeError> {
        // Without a lock: the caller owns an allocated block, and nobody else writes its
        // entry, so what it says is true. Anything else (a double free, an interior
        // pointer) takes the locked path, which names the error.
        if let Some(actual) = self.owned_order(idx)
            && order.is_none_or(|given| given == actual)
            && self.free_to_cache(idx, actual)
        {
            return Ok(actual);
        }
        self.free_to_shard(idx, order)
    }

    /// Like [`free_frame`](Self::free_frame), straight to the owning shard and as free since
    /// `since` (ms, `now_ms`): for housekeeping frees of memory the program stopped using
    /// then (they must not count as activity, nor make the memory look recently used).
    pub(crate) fn free_frame_idle(
        &self,
        idx: FrameIdx,
        order: u8,
        since: u32,
    ) -> Result<(), FreeError> {
        self.with_owner(idx, |shard| {
            let actual = shard.allocated_order(idx)?;
            if actual != order {
                return Err(FreeError::WrongOrder {
                    given: order,
                    actual,
                });
            }
            shard.free_since(idx, actual, since);
            Ok(())
        })
    }

    /// Frees to the owning shard, under its lock, checking the block there.
    #[inline(never)]
    fn free_to_shard(&self, idx: FrameIdx, order: Option<u8>) -> Result<u8, FreeError> {
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

    /// The order of the block at `idx` if its entry says "allocated", read without a lock:
    /// true for the block's owner, who is the only writer of that entry.
    #[inline]
    pub(crate) fn owned_order(&self, idx: FrameIdx) -> Option<u8> {
        match self.table.frame(idx).get() {
            (FrameState::Allocated, order) => Some(order),
            _ => None,
        }
    }

    /// The order of the allocated block starting at `ptr`: without a lock when its entry
    /// says "allocated" (see [`owned_order`](Self::owned_order)), else under the owner's lock,
    /// which names the error.
    pub(crate) fn order_of(&self, ptr: *const u8) -> Result<u8, FreeError> {
        let idx = self.frame_of(ptr)?;
        if let Some(order) = self.owned_order(idx) {
            return Ok(order);
        }
        self.locked_order(idx)
    }

    /// The order of the allocated block at `idx`, or why it is not one, under the owner's
    /// lock.
    pub(crate) fn locked_order(&self, idx: FrameIdx) -> Result<u8, FreeError> {
        self.with_owner(idx, |shard| shard.allocated_order(idx))
    }

    /// Grows the allocated block at `idx` from `from` to `to` in place, if its buddies are free.
    pub(crate) fn grow_frame(&self, idx: FrameIdx, from: u8, to: u8) -> bool {
        if to > self.resolved.max_order {
            return false;
        }
        if self.with_owner(idx, |shard| shard.grow(idx, from, to)) {
            return true;
        }
        // A buddy that starts with a block in a per-CPU cache may be free once the caches
        // are drained (which cannot happen under the shard lock: a drain frees into it).
        let cached =
            (from..to).any(|o| self.table.frame(idx.buddy(o)).state() == FrameState::CpuCached);
        cached && {
            self.drain_cpu_caches();
            self.with_owner(idx, |shard| shard.grow(idx, from, to))
        }
    }

    /// Shrinks the allocated block at `idx` from `from` to `to`, freeing the rest.
    pub(crate) fn shrink_frame(&self, idx: FrameIdx, from: u8, to: u8) {
        self.with_owner(idx, |shard| shard.shrink(idx, from, to));
    }

    /// Drains every per-CPU cache into the shards and merges every shard's small-block
    /// cache back into its buddy lists.
    pub(crate) fn drain_caches(&self) {
        self.drain_cpu_caches();
        let env = self.env();
        for shard in self.shards.iter() {
            let mut locked = shard.lock(&env);
            locked.drain_cache(0);
            self.unlock(locked);
        }
    }
}
