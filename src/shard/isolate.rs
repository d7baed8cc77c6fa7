//! Isolation: taking cold free blocks off the lists while someone outside the lock works on
//! them (the hinter advising the kernel), and putting them back through the free path.
//!
//! An isolated block is neither free nor allocated: nobody allocates or merges it. It waits
//! on the shard's isolated list until it goes back with [`Locked::return_isolated`], as the
//! class the outside work made it. The list lets the audit count isolated blocks and lets a
//! child process after `fork`, where the isolating thread does not exist, take them back
//! ([`Locked::return_all_isolated`]).

use super::counters::{DEC, bump};
use super::{ISOLATED, Locked, NIL};
use crate::config::AllocPolicy;
use crate::frame_table::{FrameIdx, FrameState, FreeClass};

/// What one pass may still take, in frames.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Frames left.
    pub(crate) frames: u64,
    /// Whether the pass took anything yet: a pass whose first candidate is larger than the
    /// whole budget takes it anyway, so that every block can be hinted whatever the budget.
    pub(crate) spent_any: bool,
}

impl Budget {
    /// A budget of `frames`.
    pub(crate) fn new(frames: u64) -> Self {
        Self {
            frames,
            spent_any: false,
        }
    }

    /// Whether a block of `order` fits, and if so takes it.
    fn take(&mut self, order: u8) -> bool {
        let frames = 1u64 << order;
        if self.frames >= frames {
            self.frames -= frames;
        } else if !self.spent_any {
            self.frames = 0; // one oversized block per pass
        } else {
            return false;
        }
        self.spent_any = true;
        true
    }
}

/// What an isolation found.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Isolation {
    /// Blocks taken.
    pub(crate) blocks: usize,
    /// Milliseconds until the next candidate turns cold, if some were too warm.
    pub(crate) next_cold_in: Option<u32>,
    /// A cold candidate did not fit in what was left of the budget: come back next pass.
    pub(crate) budget_hit: bool,
}

impl Locked<'_> {
    /// Takes cold blocks of class `from` (unhinted, or hinted to be dropped for good) and
    /// of `orders` off the lists, largest first,
    /// marks them isolated and appends them to `out`, until `out` holds `max_blocks` or
    /// the budget is spent. `cold_ms = None` takes every candidate. A candidate larger than
    /// what is left of the budget is skipped (smaller ones may still fit) and reported.
    pub(crate) fn isolate(
        &mut self,
        from: FreeClass,
        orders: std::ops::RangeInclusive<u8>,
        cold_ms: Option<u32>,
        max_blocks: usize,
        budget: &mut Budget,
        out: &mut Vec<(FrameIdx, u8)>,
    ) -> Isolation {
        let table = self.env.table;
        let now = crate::sync::now_ms();
        let mut result = Isolation::default();
        let list = self.list(from);
        let fifo = self.env.policy == AllocPolicy::Fifo;
        let top = (*orders.end()).min(self.env.max_order);
        for order in (*orders.start()..=top).rev() {
            // Oldest first: from the tail of a LIFO list, from the head of a FIFO one.
            let mut cursor = if fifo {
                self.lists.head[order as usize][list]
            } else {
                self.lists.tail[order as usize][list]
            };
            while cursor != NIL {
                if out.len() >= max_blocks {
                    return result;
                }
                let idx = FrameIdx(cursor);
                let frame = table.frame(idx);
                cursor = if fifo { frame.next() } else { frame.prev() };
                if frame.state() != from.state() {
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
                if !budget.take(order) {
                    result.budget_hit = true;
                    break; // smaller orders may still fit
                }
                self.unlink(idx, order, from);
                frame.set(FrameState::Isolated, order);
                self.link(idx, order, FreeClass::Unhinted, ISOLATED);
                bump(&self.counters(order).in_flight, 1);
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
        self.detach(idx, order, ISOLATED);
        bump(&self.counters(order).in_flight, DEC);
        let (class, since) = match class {
            Some(class) => (class, frame.since()),
            None => (FreeClass::Unhinted, crate::sync::now_ms()),
        };
        self.insert_free(idx, order, class, since);
    }

    /// Returns every isolated block as unhinted, in a process where the thread that
    /// isolated them cannot return them (a child after `fork`).
    #[cfg_attr(any(loom, miri), allow(dead_code))] // fork handlers only
    pub(crate) fn return_all_isolated(&mut self) {
        for order in 0..=self.env.max_order {
            while self.lists.head[order as usize][ISOLATED] != NIL {
                let idx = FrameIdx(self.lists.head[order as usize][ISOLATED]);
                self.return_isolated(idx, order, None);
            }
        }
    }
}
