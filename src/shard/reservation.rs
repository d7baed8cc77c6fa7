//! Capture reservations: the region a waiting request expects to coalesce, kept out of
//! reach of other allocations.
//!
//! Capture alone hands a waiter a block only if every piece of it is free at one moment.
//! While small allocations churn, they take the pieces that frees leave behind, so a region
//! is rarely whole (Linux isolates a pageblock, `MIGRATE_ISOLATE`, for the same reason). So
//! a waiting request reserves one aligned region of its order, the one with the most free
//! frames among those holding the shard's largest free pieces: its free pieces move to the
//! shard's [`RESERVED`] list, where allocation never looks, and later frees inside it merge
//! there too. When the region is whole, [`place`](Locked::place) hands it to the request;
//! when the request leaves first, [`unreserve`](Locked::unreserve) puts the pieces back.
//!
//! A reservation holds back at most one block of the request's order, and only while the
//! request waits. Free pieces keep their class, so every counter stays as it was.

use super::{Locked, RESERVED, ShardId};
use crate::frame_table::{FrameIdx, FrameState, FrameTable, NIL};

/// Reservations one shard can hold at once; a request finding them all taken waits
/// without one.
const SLOTS: usize = 4;

/// Free list entries looked at per order when choosing a region, so the choice costs a
/// bounded number of frame-table reads (at most `2^order` per candidate).
const CANDIDATES_PER_ORDER: usize = 4;

/// One reserved region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// First frame, aligned to `order`.
    pub(crate) start: FrameIdx,
    pub(crate) order: u8,
    /// The capture request it is for.
    pub(crate) ticket: u64,
}

impl Reservation {
    /// Whether the block `(idx, order)` lies inside this region and is smaller than it.
    #[inline]
    fn holds(&self, idx: FrameIdx, order: u8) -> bool {
        order < self.order && idx.0 >> self.order == self.start.0 >> self.order
    }

    /// Whether the block `(idx, order)` contains this whole region.
    #[inline]
    fn within(&self, idx: FrameIdx, order: u8) -> bool {
        order >= self.order && idx.0 >> order == self.start.0 >> order
    }

    /// Whether the two regions share a frame.
    fn overlaps(&self, start: FrameIdx, order: u8) -> bool {
        let shift = self.order.max(order);
        self.start.0 >> shift == start.0 >> shift
    }
}

/// A shard's reservations: a fixed array, since the pool may be the global allocator.
#[derive(Default)]
pub(crate) struct Reservations {
    slots: [Option<Reservation>; SLOTS],
    len: u8,
}

impl Reservations {
    /// Whether the free block `(idx, order)` belongs on the reserved list.
    #[inline]
    pub(crate) fn covers(&self, idx: FrameIdx, order: u8) -> bool {
        self.len != 0 && self.slots.iter().flatten().any(|r| r.holds(idx, order))
    }

    /// Removes and returns a reservation whose whole region lies in the free block
    /// `(idx, order)`: that region has just become whole.
    #[inline]
    pub(crate) fn take_within(&mut self, idx: FrameIdx, order: u8) -> Option<Reservation> {
        if self.len == 0 {
            return None;
        }
        self.take_first(|r| r.within(idx, order))
    }

    fn overlaps(&self, start: FrameIdx, order: u8) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|r| r.overlaps(start, order))
    }

    fn insert(&mut self, reservation: Reservation) -> bool {
        let Some(slot) = self.slots.iter_mut().find(|slot| slot.is_none()) else {
            return false;
        };
        *slot = Some(reservation);
        self.len += 1;
        true
    }

    fn remove(&mut self, ticket: u64) -> Option<Reservation> {
        self.take_first(|r| r.ticket == ticket)
    }

    /// Removes and returns the first reservation that `matches`.
    fn take_first(&mut self, matches: impl Fn(&Reservation) -> bool) -> Option<Reservation> {
        let slot = self
            .slots
            .iter_mut()
            .find(|slot| slot.as_ref().is_some_and(&matches))?;
        self.len -= 1;
        slot.take()
    }

    /// The regions reserved now.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Reservation> {
        self.slots.iter().flatten()
    }
}

/// The blocks that tile the region `(start, order)`, as `(head, order, state)`, or `None`
/// when the region is not tiled by blocks of its own: it lies inside a larger block, or is
/// one block.
fn region_blocks(
    table: &FrameTable,
    start: FrameIdx,
    order: u8,
) -> Option<impl Iterator<Item = (FrameIdx, u8, FrameState)> + '_> {
    let (state, first) = table.frame(start).get();
    if state == FrameState::Interior || first >= order {
        return None;
    }
    let end = start.0 + (1 << order);
    let mut at = start.0;
    Some(std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let idx = FrameIdx(at);
        let (state, o) = table.frame(idx).get();
        debug_assert_ne!(state, FrameState::Interior, "blocks tile the region");
        at += 1 << o;
        Some((idx, o, state))
    }))
}

impl Locked<'_> {
    /// Free frames in the region `(start, order)`, if it can be reserved at all.
    fn region_free_frames(&self, start: FrameIdx, order: u8) -> Option<u32> {
        let free = region_blocks(self.env.table, start, order)?
            .filter(|&(_, _, state)| state.free_class().is_some())
            .map(|(_, o, _)| 1u32 << o)
            .sum();
        Some(free)
    }

    /// The region of `order` worth reserving in this shard, with its free frames: the
    /// fullest-of-free among the regions that hold this shard's largest free pieces.
    pub(crate) fn reservation_candidate(&self, order: u8) -> Option<(FrameIdx, u32)> {
        if self.shard.id == ShardId::Shared || order > self.env.max_order {
            return None;
        }
        let mut best: Option<(FrameIdx, u32)> = None;
        for o in (0..order).rev() {
            for list in 0..RESERVED {
                let mut cursor = self.lists.head[o as usize][list];
                for _ in 0..CANDIDATES_PER_ORDER {
                    if cursor == NIL {
                        break;
                    }
                    let start = FrameIdx(cursor >> order << order);
                    cursor = self.env.table.frame(FrameIdx(cursor)).next();
                    if self.lists.reservations.overlaps(start, order) {
                        continue;
                    }
                    if let Some(free) = self.region_free_frames(start, order)
                        && best.is_none_or(|(_, most)| free > most)
                    {
                        best = Some((start, free));
                    }
                }
            }
            if best.is_some() {
                // Larger pieces were looked at first; smaller ones rarely do better.
                break;
            }
        }
        best
    }

    /// Reserves the region `(start, order)` for the request `ticket`: moves its free pieces
    /// to the reserved list. Fails, changing nothing, when the region no longer qualifies
    /// (another owner, reserved already, nothing free in it) or every slot is taken.
    pub(crate) fn reserve(&mut self, start: FrameIdx, order: u8, ticket: u64) -> bool {
        let env = self.env;
        if self.shard.id == ShardId::Shared
            || env.table.owner(start.chunk(env.max_order)) != self.shard.id.owner()
            || self.lists.reservations.overlaps(start, order)
            || self
                .region_free_frames(start, order)
                .is_none_or(|free| free == 0)
        {
            return false;
        }
        if !self.lists.reservations.insert(Reservation {
            start,
            order,
            ticket,
        }) {
            return false;
        }
        self.move_free_pieces(start, order, true);
        true
    }

    /// Ends the reservation of request `ticket`, if it still stands: its free pieces go
    /// back to their class lists.
    pub(crate) fn unreserve(&mut self, ticket: u64) {
        if let Some(region) = self.lists.reservations.remove(ticket) {
            self.move_free_pieces(region.start, region.order, false);
        }
    }

    /// Ends every reservation (their requests are gone: a child after `fork`).
    #[cfg_attr(any(loom, miri), allow(dead_code))] // fork handlers only
    pub(crate) fn unreserve_all(&mut self) {
        loop {
            let Some(ticket) = self.lists.reservations.iter().next().map(|r| r.ticket) else {
                return;
            };
            self.unreserve(ticket);
        }
    }

    /// Moves the free pieces of a region between their class lists and the reserved list.
    fn move_free_pieces(&mut self, start: FrameIdx, order: u8, to_reserved: bool) {
        // Relinking changes no frame's state or order, so the tiling stays readable.
        let Some(blocks) = region_blocks(self.env.table, start, order) else {
            return;
        };
        for (idx, o, state) in blocks {
            let Some(class) = state.free_class() else {
                continue;
            };
            let (from, to) = if to_reserved {
                (self.list(class), RESERVED)
            } else {
                (RESERVED, self.list(class))
            };
            self.detach(idx, o, from);
            self.link(idx, o, class, to);
        }
    }

    /// Checks that every reserved region lies in a chunk this shard owns.
    pub(crate) fn audit_reservations(&self) -> Result<(), String> {
        let env = self.env;
        for region in self.lists.reservations.iter() {
            if env.table.owner(region.start.chunk(env.max_order)) != self.shard.id.owner() {
                return Err(format!(
                    "{:?}: reserved region at frame {} lies in a chunk it does not own",
                    self.shard.id, region.start.0
                ));
            }
        }
        Ok(())
    }
}
