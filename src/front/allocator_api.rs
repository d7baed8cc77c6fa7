//! [`allocator_api2::alloc::Allocator`] for [`PagePool`] (and so for `&PagePool`) and for
//! [`PoolAlloc`], so that `hashbrown` maps and `allocator_api2` vectors can live in a pool.
//!
//! allocator-api2 0.2 is the version `hashbrown` 0.15 implements its `*_in` constructors
//! with; the `allocator-api2` feature (on by default) enables this module.
//!
//! ```
//! use allocator_api2::vec::Vec;
//! use pagepool::PagePool;
//!
//! let pool = PagePool::builder().capacity(64 << 20).hint_thread(false).build()?;
//! let mut v: Vec<u64, &PagePool> = Vec::with_capacity_in(1000, &pool);
//! v.extend(0..1000);
//! assert!(pool.contains(v.as_ptr().cast()));
//! # Ok::<(), pagepool::BuildError>(())
//! ```
//!
//! # `PagePool` as an allocator
//! Every non-empty request takes a whole block of `order_for(size, align)`, and the
//! returned slice covers the whole block, so collections use the slack as capacity.
//! Requests above the largest block, or when the pool is exhausted, fail with
//! [`AllocError`]: a dedicated pool has no fallback. A collection that cannot grow then
//! calls `handle_alloc_error`, which aborts the process: give the pool a `max_order` that
//! holds the largest collection, or use `try_reserve`. Zero-sized requests get a dangling,
//! aligned pointer and no block. `grow` takes the buddies in place when they are free;
//! `shrink` splits in place.
//!
//! # `PoolAlloc` as an allocator
//! Every request goes through the `GlobalAlloc` paths (so small ones are slab objects,
//! larger ones page blocks or mappings, see [`PoolAlloc`]), and the returned slice is
//! exactly the requested size: `deallocate` and the resizes route by address and layout
//! as `GlobalAlloc` does. `grow`, `grow_zeroed` and `shrink` with an unchanged alignment
//! are `realloc` (in place where it can be); a changed alignment moves. Zero-sized
//! requests get a dangling, aligned pointer.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use crate::frame_table::FreeClass;
use crate::front::page_pool::PagePool;
use crate::pool::PoolCore;
use crate::{PoolAlloc, block_size, order_for};

/// A dangling pointer aligned for `layout`, as an empty slice.
#[inline]
fn dangling(layout: Layout) -> NonNull<[u8]> {
    // `align` is a non-zero power of two, so the address is non-null and aligned.
    let ptr = NonNull::new(layout.align() as *mut u8).expect("alignment is non-zero");
    NonNull::slice_from_raw_parts(ptr, 0)
}

/// The order that serves `layout` in `core`, if any.
#[inline]
fn order_in(core: &PoolCore, layout: Layout) -> Result<u8, AllocError> {
    order_for(layout.size(), layout.align())
        .filter(|&o| o <= core.max_order())
        .ok_or(AllocError)
}

fn allocate_in(core: &PoolCore, layout: Layout, zero: bool) -> Result<NonNull<[u8]>, AllocError> {
    if layout.size() == 0 {
        return Ok(dangling(layout));
    }
    let order = order_in(core, layout)?;
    let (idx, class) = core
        .alloc_frame(order, zero, None)
        .map_err(|_| AllocError)?;
    let ptr = core.frame_ptr(idx);
    let len = block_size(order);
    if zero && class != FreeClass::Zero {
        // SAFETY: the block was just handed to us: `len` bytes nobody else may touch.
        unsafe { ptr::write_bytes(ptr.as_ptr(), 0, len) };
    }
    Ok(NonNull::slice_from_raw_parts(ptr, len))
}

/// The order of the allocated block at `ptr`; panics for a pointer the pool did not hand
/// out (the caller broke `Allocator`'s contract).
fn order_of(core: &PoolCore, ptr: NonNull<u8>) -> u8 {
    match core.order_of(ptr.as_ptr()) {
        Ok(order) => order,
        Err(err) => panic!("pagepool: {ptr:p} is not a block of this pool ({err})"),
    }
}

/// # Safety
/// As [`Allocator::deallocate`] for a pool block (or a zero-sized layout).
unsafe fn deallocate_in(core: &PoolCore, ptr: NonNull<u8>, layout: Layout) {
    if layout.size() == 0 {
        return;
    }
    let freed = core
        .frame_of(ptr.as_ptr())
        .and_then(|idx| core.free_frame(idx, None));
    if let Err(err) = freed {
        panic!(
            "pagepool: deallocate of {ptr:p}, which is not an allocated block of this pool ({err})"
        );
    }
}

/// # Safety
/// As [`Allocator::grow`] / [`Allocator::grow_zeroed`] for a pool block.
unsafe fn grow_in(
    core: &PoolCore,
    ptr: NonNull<u8>,
    old: Layout,
    new: Layout,
    zero: bool,
) -> Result<NonNull<[u8]>, AllocError> {
    if old.size() == 0 {
        return allocate_in(core, new, zero);
    }
    let old_order = order_of(core, ptr);
    let new_order = order_in(core, new)?;
    let in_place = if new_order <= old_order {
        // The block already holds the new layout (its address is aligned to its size,
        // which is at least the new alignment).
        Some(old_order)
    } else {
        let idx = core.frame_of(ptr.as_ptr()).expect("checked by order_of");
        core.grow_frame(idx, old_order, new_order)
            .then_some(new_order)
    };
    if let Some(order) = in_place {
        let len = block_size(order);
        if zero {
            // SAFETY: bytes old.size()..len belong to the (grown) block we own.
            unsafe { ptr::write_bytes(ptr.as_ptr().add(old.size()), 0, len - old.size()) };
        }
        return Ok(NonNull::slice_from_raw_parts(ptr, len));
    }
    let fresh = allocate_in(core, new, zero)?;
    // SAFETY: distinct live blocks; the old one holds `old.size()` bytes, the new more.
    unsafe { ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.cast::<u8>().as_ptr(), old.size()) };
    // SAFETY: the caller hands over the old block.
    unsafe { deallocate_in(core, ptr, old) };
    Ok(fresh)
}

/// # Safety
/// As [`Allocator::shrink`] for a pool block.
unsafe fn shrink_in(
    core: &PoolCore,
    ptr: NonNull<u8>,
    old: Layout,
    new: Layout,
) -> Result<NonNull<[u8]>, AllocError> {
    if new.size() == 0 {
        // SAFETY: the caller hands over the block.
        unsafe { deallocate_in(core, ptr, old) };
        return Ok(dangling(new));
    }
    let old_order = order_of(core, ptr);
    let new_order = order_in(core, new)?;
    if new_order <= old_order {
        if new_order < old_order {
            let idx = core.frame_of(ptr.as_ptr()).expect("checked by order_of");
            core.shrink_frame(idx, old_order, new_order);
        }
        return Ok(NonNull::slice_from_raw_parts(ptr, block_size(new_order)));
    }
    // A larger alignment than the block has: move.
    let fresh = allocate_in(core, new, false)?;
    // SAFETY: distinct live blocks; both hold at least `new.size()` bytes.
    unsafe { ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.cast::<u8>().as_ptr(), new.size()) };
    // SAFETY: the caller hands over the old block.
    unsafe { deallocate_in(core, ptr, old) };
    Ok(fresh)
}

// SAFETY: blocks stay valid until freed or the pool is dropped (the region lives as long
// as the pool, which a `Vec<T, &PagePool>` borrows and a `Vec<T, PagePool>` owns); a block
// is handed out once until freed; grow/shrink keep contents up to the smaller size.
unsafe impl Allocator for PagePool {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        allocate_in(self.core(), layout, false)
    }

    #[inline]
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        allocate_in(self.core(), layout, true)
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { deallocate_in(self.core(), ptr, layout) }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { grow_in(self.core(), ptr, old, new, false) }
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { grow_in(self.core(), ptr, old, new, true) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { shrink_in(self.core(), ptr, old, new) }
    }
}

// SAFETY: delegates to the `GlobalAlloc` implementation, which returns valid memory of the
// layout and routes frees and resizes by address; zero-sized requests never reach it.
unsafe impl<F: GlobalAlloc> Allocator for PoolAlloc<F> {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { GlobalAlloc::alloc(self, layout) }).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(ptr, layout.size()))
    }

    #[inline]
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        // SAFETY: the layout has a non-zero size.
        let ptr =
            NonNull::new(unsafe { GlobalAlloc::alloc_zeroed(self, layout) }).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(ptr, layout.size()))
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: allocated by `allocate*` with this layout (non-zero: a real one).
            unsafe { GlobalAlloc::dealloc(self, ptr.as_ptr(), layout) }
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.resize(ptr, old, new, false) }
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.resize(ptr, old, new, true) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.resize(ptr, old, new, false) }
    }
}

impl<F: GlobalAlloc> PoolAlloc<F> {
    /// `grow`, `grow_zeroed` and `shrink` through `realloc` (in place where the pool can).
    ///
    /// # Safety
    /// As [`Allocator::grow`] (or `shrink`): `ptr` was allocated by `self` with `old`.
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zero: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 {
            return if zero {
                self.allocate_zeroed(new)
            } else {
                self.allocate(new)
            };
        }
        if new.size() == 0 {
            // SAFETY: the caller hands over the allocation.
            unsafe { Allocator::deallocate(self, ptr, old) };
            return Ok(dangling(new));
        }
        let moved = if new.align() == old.align() {
            // SAFETY: `ptr` was allocated with `old`; `new.size()` is non-zero and a valid
            // size for this alignment (it comes from a `Layout`).
            NonNull::new(unsafe { GlobalAlloc::realloc(self, ptr.as_ptr(), old, new.size()) })
                .ok_or(AllocError)?
        } else {
            let fresh = Allocator::allocate(self, new)?.cast::<u8>();
            // SAFETY: distinct live allocations, both holding the smaller size.
            unsafe {
                ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.as_ptr(), old.size().min(new.size()))
            };
            // SAFETY: the caller hands over the old allocation.
            unsafe { Allocator::deallocate(self, ptr, old) };
            fresh
        };
        if zero && new.size() > old.size() {
            // SAFETY: the allocation holds `new.size()` bytes; the tail is ours to write.
            unsafe { ptr::write_bytes(moved.as_ptr().add(old.size()), 0, new.size() - old.size()) };
        }
        Ok(NonNull::slice_from_raw_parts(moved, new.size()))
    }
}
