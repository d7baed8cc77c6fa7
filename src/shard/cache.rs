//! The shard's cache of small freed blocks: Linux's per-CPU lists, under the shard lock.
//!
//! A free followed by an allocation of the same size touches one list head instead of
//! merging and splitting. Cached blocks are free (counted in `freed - bound`) but not in
//! the buddy lists, so they do not merge until the cache is drained.

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
        self.lists.cache_len[o] -= 1;
        let c = self.counters(order);
        bump(&c.cached, DEC);
        bump(&c.bound, 1);
        Some(idx)
    }

    pub(super) fn cache_push(&mut self, idx: FrameIdx, order: u8) {
        let o = order as usize;
        let frame = self.env.table.frame(idx);
        frame.set(FrameState::Cached, order);
        frame.set_next(self.lists.cache_head[o]);
        self.lists.cache_head[o] = idx.0;
        self.lists.cache_len[o] += 1;
        let c = self.counters(order);
        bump(&c.freed, 1);
        bump(&c.cached, 1);
    }

    /// Merges cached blocks back into the buddy lists: `keep` per order stay cached.
    pub(crate) fn drain_cache(&mut self, keep: u32) {
        for order in 0..self.env.max_order {
            while self.lists.cache_len[order as usize] > keep {
                let idx = self.cache_pop(order).expect("cache length says non-empty");
                self.insert_free(idx, order, FreeClass::Unhinted);
            }
        }
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
            self.lists.cache_len[o] -= 1;
            let c = self.counters(order);
            bump(&c.cached, DEC);
            bump(&c.bound, 1);
            self.insert_free(idx, order, FreeClass::Unhinted);
        }
    }
}
