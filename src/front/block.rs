//! [`Block`]: an owned handle to an allocated block.

use std::ptr::NonNull;

use crate::FRAME_SIZE;

/// An allocated block: `4 KiB << order` bytes, aligned to its size.
///
/// A `Block` is an owned handle, like a `Box` without a destructor: give it back with
/// [`PagePool::free`](crate::PagePool::free). Dropping it leaks the block (it stays allocated). To keep only a
/// pointer, use [`Block::into_raw`] and [`PagePool::free_raw`](crate::PagePool::free_raw).
///
/// The contents of a new block are unspecified (old data, or zeros if the kernel reclaimed
/// a hinted page) unless it came from [`PagePool::alloc_zeroed`](crate::PagePool::alloc_zeroed).
///
/// A block stays valid memory even if its pool is dropped first: a pool dropped with
/// blocks still allocated leaks its region rather than unmapping it.
#[must_use = "a Block that is dropped stays allocated; free it with PagePool::free"]
pub struct Block {
    ptr: NonNull<u8>,
    /// The pool's id in the upper 32 bits, the order in the low byte. Two words in all,
    /// so that the handle is passed and returned in two registers (a pointer and an
    /// integer) instead of through memory, where a caller's 16-byte reload of what was
    /// just stored as separate fields stalls store-to-load forwarding (about 10 ns per
    /// `alloc` + `free` on AMD Zen; see `PagePool::alloc`).
    tag: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("ptr", &self.ptr)
            .field("order", &self.order())
            .field("pool", &self.pool_id())
            .finish()
    }
}

// SAFETY: a Block is the unique owner of its bytes, like a Box<[u8]>.
unsafe impl Send for Block {}
// SAFETY: `&Block` only exposes the address and `&[u8]` reads.
unsafe impl Sync for Block {}

impl Block {
    /// First byte of the block.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// First byte of the block.
    #[inline]
    pub fn as_non_null(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Size in bytes: `4096 << order`.
    #[inline]
    pub fn len(&self) -> usize {
        FRAME_SIZE << self.order()
    }

    /// Always false: a block is at least 4 KiB.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The block's order.
    #[inline]
    pub fn order(&self) -> u8 {
        self.tag as u8
    }

    /// The block's bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the block owns `len` bytes of mapped memory; mapped anonymous memory
        // always reads as initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The block's bytes, writable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    #[inline]
    pub(crate) fn pool_id(&self) -> u32 {
        (self.tag >> 32) as u32
    }

    /// Gives up the handle and returns the pointer. Free it with [`PagePool::free_raw`](crate::PagePool::free_raw),
    /// which finds the order in the frame table.
    #[inline]
    pub fn into_raw(self) -> NonNull<u8> {
        self.ptr
    }
}

impl Block {
    /// A handle to the block `(ptr, order)` of the pool with id `pool`.
    #[inline]
    pub(crate) fn new(ptr: NonNull<u8>, order: u8, pool: u32) -> Self {
        Self {
            ptr,
            tag: (u64::from(pool) << 32) | u64::from(order),
        }
    }

    /// Sets the order after an in-place resize.
    #[inline]
    pub(crate) fn set_order(&mut self, order: u8) {
        self.tag = (self.tag & !0xff) | u64::from(order);
    }
}
