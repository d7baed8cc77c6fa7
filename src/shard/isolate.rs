//! Isolation: taking cold free blocks off the lists while someone outside the lock works on
//! them (the hinter advising the kernel), and putting them back through the free path.
//!
//! An isolated block is neither free nor allocated: nobody allocates or merges it. It goes
//! back with [`Locked::return_isolated`], as the class the outside work made it.

use super::counters::{DEC, bump};
use super::{Locked, NIL};
use crate::config::AllocPolicy;
use crate::frame_table::{FrameIdx, FrameState, FreeClass};

/// Why the hinter should come back later.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Isolation {
    /// Blocks taken.
    pub(crate) blocks: usize,
    /// Milliseconds until the next candidate turns cold, if some were too warm.
    pub(crate) next_cold_in: Option<u32>,
}

impl Locked<'_> {
    /// Takes cold unhinted blocks at or above `min_order` off the lists, marks them
    /// isolated and appends them to `out`, until `out` holds `max_blocks` or
    /// `budget_frames` is spent. `cold_ms = None` takes every candidate.
    pub(crate) fn isolate(
        &mut self,
        min_order: u8,
        cold_ms: Option<u32>,
        max_blocks: usize,
        budget_frames: &mut u64,
        out: &mut Vec<(FrameIdx, u8)>,
    ) -> Isolation {
        let table = self.env.table;
        let now = crate::sync::now_ms();
        let mut result = Isolation::default();
        let list = self.list(FreeClass::Unhinted);
        let fifo = self.env.policy == AllocPolicy::Fifo;
        for order in (min_order..=self.env.max_order).rev() {
            // Oldest first: from the tail of a LIFO list, from the head of a FIFO one.
            let mut cursor = if fifo {
                self.lists.head[order as usize][list]
            } else {
                self.lists.tail[order as usize][list]
            };
            while cursor != NIL {
                if out.len() >= max_blocks || *budget_frames < 1 << order {
                    return result;
                }
                let idx = FrameIdx(cursor);
                let frame = table.frame(idx);
                cursor = if fifo { frame.next() } else { frame.prev() };
                if frame.state() != FrameState::Unhinted {
                    continue; // FIFO lists mix classes
                }
                if let Some(cold) = cold_ms {
                    let age = now.wrapping_sub(frame.since());
                    if age < cold {
                        let wait = cold - age;
                        result.next_cold_in =
                            Some(result.next_cold_in.map_or(wait, |w| w.min(wait)));
                        if fifo {
                            continue;
                        }
                        break; // the rest of a LIFO list is warmer still
                    }
                }
                self.unlink(idx, order, FreeClass::Unhinted);
                frame.set(FrameState::Isolated, order);
                bump(&self.counters(order).in_flight, 1);
                *budget_frames -= 1 << order;
                out.push((idx, order));
                result.blocks += 1;
            }
        }
        result
    }

    /// Returns an isolated block: as `class` if the advice took, else as unhinted (and
    /// warm again, so a failing range is retried only after another delay).
    pub(crate) fn return_isolated(&mut self, idx: FrameIdx, order: u8, class: Option<FreeClass>) {
        let frame = self.env.table.frame(idx);
        debug_assert_eq!(frame.get(), (FrameState::Isolated, order));
        bump(&self.counters(order).in_flight, DEC);
        let class = class.unwrap_or(FreeClass::Unhinted);
        if class == FreeClass::Unhinted {
            frame.set_since(crate::sync::now_ms());
        }
        self.insert_free(idx, order, class);
    }
}
