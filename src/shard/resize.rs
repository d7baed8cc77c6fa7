//! In-place resize of an allocated block: grow by absorbing free upper buddies, shrink by
//! freeing the upper halves.

use super::Locked;
use super::counters::{DEC, bump};
use crate::frame_table::{FrameIdx, FrameState, FreeClass};

impl Locked<'_> {
    /// Grows the allocated block `(idx, from)` to order `to` by absorbing its free upper
    /// buddies. Fails, changing nothing, unless every one is a whole free block.
    pub(crate) fn grow(&mut self, idx: FrameIdx, from: u8, to: u8) -> bool {
        if to > self.env.max_order || idx.0 & ((1 << to) - 1) != 0 {
            return false;
        }
        let table = self.env.table;
        let whole_free = |order: u8| {
            let (state, o) = table.frame(idx.buddy(order)).get();
            o == order && state.free_class().is_some()
        };
        if !(from..to).all(whole_free) {
            // A buddy that starts with a cached piece may be whole once the cache merges.
            let cached =
                (from..to).any(|o| table.frame(idx.buddy(o)).state() == FrameState::Cached);
            if !cached {
                return false;
            }
            self.drain_cache(0);
            if !(from..to).all(whole_free) {
                return false;
            }
        }
        for order in from..to {
            let buddy = idx.buddy(order);
            let class = table
                .frame(buddy)
                .state()
                .free_class()
                .expect("checked free");
            self.unlink(buddy, order, class);
            table.frame(buddy).set(FrameState::Interior, 0);
        }
        bump(&self.counters(from).allocated, DEC);
        self.mark_allocated(idx, to);
        true
    }

    /// Shrinks the allocated block `(idx, from)` to order `to`, freeing the upper parts.
    pub(crate) fn shrink(&mut self, idx: FrameIdx, from: u8, to: u8) {
        debug_assert!(to <= from);
        bump(&self.counters(from).allocated, DEC);
        self.mark_allocated(idx, to);
        let now = crate::sync::now_ms();
        for order in (to..from).rev() {
            self.insert_free(idx.plus(1 << order), order, FreeClass::Unhinted, now);
        }
    }
}
