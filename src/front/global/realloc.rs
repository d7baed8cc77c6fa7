//! `realloc`: in place where the allocation's home allows it (a slab object within its
//! class, a page block whose buddies are free or whose tail can go, a direct mapping with
//! `mremap`), otherwise by moving to where the new size belongs, counting each move.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;

use super::counters::{add, bump};
use super::{PoolAlloc, Route, fatal, huge, release_tail};
use crate::frame_table::FrameState;
use crate::pool::PoolCore;
use crate::slab::{SlabAlloc, reentry};
use crate::{block_size, order_for};

impl<F: GlobalAlloc> PoolAlloc<F> {
    /// Moves an allocation to a fresh one of `new_size` (same alignment), copying what
    /// both hold, and frees the old one with `free_old`. Null (the old one untouched) when
    /// nothing could be allocated.
    #[inline]
    fn move_to_new(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        free_old: impl FnOnce(),
    ) -> *mut u8 {
        // SAFETY: the caller of `realloc` guarantees `new_size` with this alignment is a
        // valid, non-zero layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = self.allocate(new_layout, false);
        if new.is_null() {
            return new; // the old allocation stays valid, as `realloc` requires
        }
        // SAFETY: both allocations are live and distinct; copy what both hold.
        unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        free_old();
        new
    }

    /// `realloc` of a slab object.
    ///
    /// # Safety
    /// `ptr` is a live slab object allocated with `layout`, found in the slab `entry`
    /// describes; `new_size` is a valid size for `layout.align()`.
    pub(super) unsafe fn realloc_object(
        &self,
        slab: &SlabAlloc,
        ptr: *mut u8,
        entry: crate::slab::Entry,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        let size = SlabAlloc::object_size(entry);
        if new_size <= size && new_size > size / 2 {
            return ptr; // still fits, and would not shrink to a much smaller class
        }
        // SAFETY: `ptr` is live in `entry`'s slab (the caller's guarantee).
        let new = self.move_to_new(ptr, layout, new_size, || unsafe { slab.free(ptr, entry) });
        self.count_move_from_pool(new, new_size, layout.align());
        new
    }

    /// `realloc` of a page block.
    ///
    /// # Safety
    /// `ptr` is a live pool block allocated with `layout`; `new_size` is a valid size for
    /// `layout.align()`.
    pub(super) unsafe fn realloc_pool(
        &self,
        core: &PoolCore,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        let align = layout.align();
        // A page block's order always follows from its current layout: `alloc` and every
        // in-place resize below keep `order_for(size, align)` equal to it.
        let old_order =
            order_for(layout.size(), align).expect("a pool block's layout has an order");
        // The block must be allocated with that order: resizing in place trusts it. (A
        // racy read of the frame table, exact for a block the caller owns.)
        let idx = match core.frame_of(ptr) {
            Ok(idx) if core.table().frame(idx).get() == (FrameState::Allocated, old_order) => idx,
            _ => fatal(b"pagepool: realloc of a pointer that is not a pool block allocated with this layout\n"),
        };
        // Where a fresh allocation of the new size would go; a block that would become a
        // small object stays a block while it keeps more than half of it (no copy).
        let new_order = match self.route(new_size, align) {
            Route::Page(order) => Some(order),
            Route::Small(_) => order_for(new_size, align).filter(|&o| o == old_order),
            Route::Huge => None,
        };
        if let Some(order) = new_order {
            let Some(_inside) = reentry::enter() else {
                // Inside the pool already: no lock may be taken, so no resize in place; the
                // old block's free is deferred.
                return self.move_to_new(ptr, layout, new_size, || self.defer_free(ptr));
            };
            if order == old_order {
                if new_size < layout.size() {
                    release_tail(ptr, new_size, block_size(order));
                }
                return ptr;
            }
            if order < old_order {
                core.shrink_frame(idx, old_order, order);
                release_tail(ptr, new_size, block_size(order));
                bump(&self.counters.shrunk_in_place);
                return ptr;
            }
            if core.grow_frame(idx, old_order, order) {
                bump(&self.counters.grown_in_place);
                return ptr;
            }
        }
        let new = self.move_to_new(ptr, layout, new_size, || self.free_pool(core, ptr));
        self.count_move_from_pool(new, new_size, align);
        new
    }

    /// Counts a `realloc` that moved an allocation of the pool to `new` (null: it failed).
    fn count_move_from_pool(&self, new: *mut u8, new_size: usize, align: usize) {
        if new.is_null() {
            return;
        }
        let counter = if self.contains(new) {
            &self.counters.moved_within_pool
        } else if new_size.max(align) > self.map_floor {
            &self.counters.moved_out_of_pool
        } else {
            &self.counters.moved_to_fallback
        };
        bump(counter);
    }

    /// `realloc` of a direct mapping.
    ///
    /// # Safety
    /// `ptr` is a live mapping made for `layout` (above the largest block).
    pub(super) unsafe fn realloc_huge(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        // SAFETY: as `move_to_new`: a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if self.is_mapping(new_layout) {
            // SAFETY: a mapping made for `layout` (the caller's guarantee).
            let new = unsafe { huge::remap(ptr, layout.size(), new_size, layout.align()) };
            if !new.is_null() {
                bump(&self.counters.huge_remaps);
                add(
                    &self.counters.huge_bytes,
                    (new_size as u64).wrapping_sub(layout.size() as u64),
                );
            }
            return new;
        }
        // At or below the floor it must leave the mapping (a mapping is recognised by its
        // layout): into the pool, or the fallback.
        self.move_to_new(ptr, layout, new_size, || {
            // SAFETY: the mapping was made for `layout` and is no longer used.
            unsafe { huge::unmap(ptr, layout.size(), layout.align()) };
            self.unmapped(layout);
        })
    }

    /// `realloc` of a fallback allocation.
    ///
    /// # Safety
    /// `ptr` was allocated by the fallback with `layout`; `new_size` is a valid size.
    pub(super) unsafe fn realloc_fallback(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        // SAFETY: as `move_to_new`: a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY (both closures): the fallback allocated `ptr` with `layout`.
        let free_old = || unsafe { self.fallback.dealloc(ptr, layout) };
        if self.is_mapping(new_layout) {
            // Past the floor it must become a mapping (see the module docs).
            return self.move_to_new(ptr, layout, new_size, free_old);
        }
        if new_size > layout.size() && self.pool_wanted(new_size) {
            // Growing: into the pool, if it has room.
            let new = self.move_to_new(ptr, layout, new_size, free_old);
            if !new.is_null() {
                if self.contains(new) {
                    bump(&self.counters.moved_to_pool);
                }
                return new;
            }
        }
        // SAFETY: a fallback allocation, forwarded with the caller's guarantees.
        unsafe { self.fallback.realloc(ptr, layout, new_size) }
    }
}
