//! Allocation, frees and in-place resize: the paths every front end takes.

use super::PoolCore;
use crate::error::{AllocError, FreeError};
use crate::frame_table::{FrameIdx, FreeClass, Owner};
use crate::shard::{Env, Locked, PREFER_RESIDENT, PREFER_ZERO};

impl PoolCore {
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
                if let Some((_, shard)) = held.take() {
                    self.unlock(shard); // before locking another shard
                }
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
            let mut locked = shard.lock(&env);
            locked.drain_cache(0);
            self.unlock(locked);
        }
    }
}
