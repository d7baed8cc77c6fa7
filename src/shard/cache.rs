//! The shard's cache of small freed blocks: Linux's per-CPU lists, under the shard lock.
//!
//! A free followed by an allocation of the same size touches one list head instead of
//! merging and splitting. Cached blocks are free (counted in `freed - bound`) but not in
//! the buddy lists, so they do not merge until the cache is drained: when it overflows
//! (the older half), when an allocation would otherwise fail, when capture waits, and when
//! a hinting pass finds blocks that stayed cached longer than the hint delay, which it
//! merges so they can be hinted. Each cached block carries the time it was freed.

use super::counters::{DEC, bump};
use super::{Locked, NIL};
use crate::frame_table::{FrameIdx, FrameState, FreeClass};

impl Locked<'_> {
    #[inline]
    pub(super) fn cache_pop(&mut self, order: u8) -> Option<FrameIdx> {
        let o = order as usize;
        if self.lists.cache_head[o] == NIL {
            return None;
        }
        let idx = FrameIdx(self.lists.cache_head[o]);
        self.lists.cache_head[o] = self.env.table.frame(idx).next();
        self.uncount_cached(order);
        Some(idx)
    }

    /// Caches a block freed at `now`.
    pub(super) fn cache_push(&mut self, idx: FrameIdx, order: u8, now: u32) {
        let o = order as usize;
        let frame = self.env.table.frame(idx);
        frame.set(FrameState::Cached, order);
        frame.set_since(now);
        frame.set_next(self.lists.cache_head[o]);
        self.lists.cache_head[o] = idx.0;
        self.lists.cache_len[o] += 1;
        if self.lists.cached_blocks == 0 {
            self.lists.news.cache_started = true;
        }
        self.lists.cached_blocks += 1;
        let c = self.counters(order);
        bump(&c.freed, 1);
        bump(&c.cached, 1);
    }

    fn uncount_cached(&mut self, order: u8) {
        self.lists.cache_len[order as usize] -= 1;
        self.lists.cached_blocks -= 1;
        let c = self.counters(order);
        bump(&c.cached, DEC);
        bump(&c.bound, 1);
    }

    /// Merges a block taken out of the cache into the buddy lists, as warm as it was.
    fn merge_cached(&mut self, idx: FrameIdx, order: u8) {
        let since = self.env.table.frame(idx).since();
        self.insert_free(idx, order, FreeClass::Unhinted, since);
    }

    /// Merges cached blocks back into the buddy lists: `keep` per order stay cached.
    pub(crate) fn drain_cache(&mut self, keep: u32) {
        for order in 0..self.env.max_order {
            while self.lists.cache_len[order as usize] > keep {
                let idx = self.cache_pop(order).expect("cache length says non-empty");
                self.merge_cached(idx, order);
            }
        }
    }

    /// Merges the cached blocks freed at least `cold_ms` before `now` (all of them for
    /// `None`); the warmer ones stay, in order. Returns the milliseconds until the next
    /// one turns cold, if any stays.
    pub(crate) fn drain_cold_cache(&mut self, now: u32, cold_ms: Option<u32>) -> Option<u32> {
        let Some(cold) = cold_ms else {
            self.drain_cache(0);
            return None;
        };
        let table = self.env.table;
        let mut next_cold_in: Option<u32> = None;
        for order in 0..self.env.max_order {
            let o = order as usize;
            // Rebuild the list from the warm blocks, keeping their order (hottest first).
            let mut cursor = std::mem::replace(&mut self.lists.cache_head[o], NIL);
            let mut tail = NIL;
            while cursor != NIL {
                let idx = FrameIdx(cursor);
                let frame = table.frame(idx);
                cursor = frame.next();
                let age = now.wrapping_sub(frame.since());
                if age < cold {
                    let wait = cold - age;
                    next_cold_in = Some(next_cold_in.map_or(wait, |w| w.min(wait)));
                    frame.set_next(NIL);
                    if tail == NIL {
                        self.lists.cache_head[o] = idx.0;
                    } else {
                        table.frame(FrameIdx(tail)).set_next(idx.0);
                    }
                    tail = idx.0;
                } else {
                    self.uncount_cached(order);
                    self.merge_cached(idx, order);
                }
            }
        }
        next_cold_in
    }

    pub(super) fn drain_cache_order(&mut self, order: u8, keep: u32) {
        // The list is LIFO: skip the `keep` hottest and merge the rest.
        let table = self.env.table;
        let o = order as usize;
        let mut cursor = self.lists.cache_head[o];
        for _ in 1..keep {
            if cursor == NIL {
                return;
            }
            cursor = table.frame(FrameIdx(cursor)).next();
        }
        if cursor == NIL {
            return;
        }
        let mut rest = if keep == 0 {
            let all = self.lists.cache_head[o];
            self.lists.cache_head[o] = NIL;
            all
        } else {
            let rest = table.frame(FrameIdx(cursor)).next();
            table.frame(FrameIdx(cursor)).set_next(NIL);
            rest
        };
        while rest != NIL {
            let idx = FrameIdx(rest);
            rest = table.frame(idx).next();
            self.uncount_cached(order);
            self.merge_cached(idx, order);
        }
    }
}
