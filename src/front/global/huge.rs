//! Requests above the pool's largest block: a private anonymous mapping each, grown and
//! shrunk with Linux's `mremap`, unmapped by `dealloc`.
//!
//! glibc does the same above its mmap threshold; what it lacks is alignment: a mapping is
//! only page-aligned, so a larger alignment over-maps by `align` and unmaps the unused
//! head and tail. `realloc` never copies: `mremap(MREMAP_MAYMOVE)` moves the page tables.
//! For an alignment above a page, where the kernel may move the mapping anywhere, the new
//! place is chosen first: an aligned range is reserved (`PROT_NONE`, no memory), the
//! mapping is moved into it with `MREMAP_FIXED`, and the rest of the reservation is
//! unmapped.
//!
//! Routing needs no registry: `GlobalAlloc` hands `dealloc` and `realloc` the layout, and
//! a layout above the largest block is always a mapping here (the adapter never sends such
//! a request to the fallback, not even from inside the pool or with the pool switched
//! off), while nothing of the pool's region is ever one.
//!
//! Under Miri, which cannot model these calls, the system allocator stands in.

#[cfg(not(miri))]
mod imp {
    use std::ptr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The page size, read once (`sysconf` does not allocate).
    fn page() -> usize {
        static PAGE: AtomicUsize = AtomicUsize::new(0);
        let mut page = PAGE.load(Ordering::Relaxed);
        if page == 0 {
            // SAFETY: sysconf has no preconditions.
            let got = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            page = if got > 0 { got as usize } else { 4096 };
            PAGE.store(page, Ordering::Relaxed);
        }
        page
    }

    /// `size` rounded up to whole pages, if that fits.
    fn pages(size: usize) -> Option<usize> {
        size.checked_next_multiple_of(page())
    }

    /// Maps `len` bytes (`prot`, private, anonymous), or returns null.
    fn mmap(len: usize, prot: i32, extra: i32) -> *mut u8 {
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            ptr::null_mut()
        } else {
            p.cast()
        }
    }

    /// Unmaps `[at, at + len)` if `len` is not 0.
    ///
    /// # Safety
    /// The range is part of a mapping of ours that nothing uses any more.
    unsafe fn unmap_range(at: *mut u8, len: usize) {
        if len != 0 {
            // SAFETY: the caller's guarantee.
            unsafe { libc::munmap(at.cast(), len) };
        }
    }

    /// Reserves `len` bytes aligned to `align` (above a page) with `prot`: maps
    /// `len + align - page` bytes and unmaps what lies outside the aligned part.
    fn map_aligned(len: usize, align: usize, prot: i32, extra: i32) -> *mut u8 {
        let Some(total) = len.checked_add(align - page()) else {
            return ptr::null_mut();
        };
        let raw = mmap(total, prot, extra);
        if raw.is_null() {
            return raw;
        }
        let head = raw.align_offset(align);
        let start = raw.wrapping_add(head);
        // SAFETY: head and tail lie inside the mapping just made, outside [start, +len).
        unsafe {
            unmap_range(raw, head);
            unmap_range(start.wrapping_add(len), total - head - len);
        }
        start
    }

    /// A new mapping of at least `size` bytes aligned to `align`, reading as zeros; null
    /// when the kernel refuses.
    pub(crate) fn map(size: usize, align: usize) -> *mut u8 {
        let Some(len) = pages(size) else {
            return ptr::null_mut();
        };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        if align <= page() {
            mmap(len, rw, 0)
        } else {
            map_aligned(len, align, rw, 0)
        }
    }

    /// Unmaps a mapping made by [`map`] or [`remap`] for `size` bytes.
    ///
    /// # Safety
    /// `ptr` is such a mapping, of `size` bytes, and nothing uses it any more.
    pub(crate) unsafe fn unmap(ptr: *mut u8, size: usize) {
        let len = pages(size).expect("mapped with this size");
        // SAFETY: the caller's guarantee.
        unsafe { unmap_range(ptr, len) };
    }

    /// Resizes the mapping at `ptr` from `old` to `new` bytes, keeping the contents and
    /// the alignment `align`, without copying. Null when the kernel refuses (the old
    /// mapping then stays as it was).
    ///
    /// # Safety
    /// `ptr` is a mapping made by [`map`] or `remap` for `old` bytes and `align`.
    pub(crate) unsafe fn remap(ptr: *mut u8, old: usize, new: usize, align: usize) -> *mut u8 {
        let (Some(old_len), Some(new_len)) = (pages(old), pages(new)) else {
            return ptr::null_mut();
        };
        if old_len == new_len {
            return ptr;
        }
        if align <= page() || new_len < old_len {
            // Shrinking never moves; growing moves wherever the kernel likes, which keeps
            // page alignment.
            let flags = if new_len < old_len {
                0
            } else {
                libc::MREMAP_MAYMOVE
            };
            // SAFETY: resizes our own mapping; the kernel keeps its contents.
            let q = unsafe { libc::mremap(ptr.cast(), old_len, new_len, flags) };
            return if q == libc::MAP_FAILED {
                ptr::null_mut()
            } else {
                q.cast()
            };
        }
        // Growing with a large alignment: in place if the pages above are free, ...
        // SAFETY: as above; without MREMAP_MAYMOVE the mapping stays where it is.
        let q = unsafe { libc::mremap(ptr.cast(), old_len, new_len, 0) };
        if q != libc::MAP_FAILED {
            return ptr;
        }
        // ... else into an aligned reservation, which the move replaces.
        let target = map_aligned(new_len, align, libc::PROT_NONE, libc::MAP_NORESERVE);
        if target.is_null() {
            return target;
        }
        // SAFETY: moves our mapping onto `target`, a reservation of exactly `new_len`
        // bytes of ours that nothing uses: MREMAP_FIXED unmaps it first.
        let q = unsafe {
            libc::mremap(
                ptr.cast(),
                old_len,
                new_len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.cast::<libc::c_void>(),
            )
        };
        if q == libc::MAP_FAILED {
            // SAFETY: the reservation is ours and unused.
            unsafe { unmap_range(target, new_len) };
            return ptr::null_mut();
        }
        q.cast()
    }
}

#[cfg(miri)]
mod imp {
    use std::alloc::{GlobalAlloc, Layout, System};

    pub(crate) fn map(size: usize, align: usize) -> *mut u8 {
        match Layout::from_size_align(size, align) {
            // SAFETY: a non-zero size (a huge request).
            Ok(layout) => unsafe { System.alloc_zeroed(layout) },
            Err(_) => std::ptr::null_mut(),
        }
    }

    /// # Safety
    /// As the mmap version: `ptr` came from `map` or `remap` with `size` (and `align`,
    /// which the system allocator needs back: callers pass the layout's).
    pub(crate) unsafe fn unmap_aligned(ptr: *mut u8, size: usize, align: usize) {
        // SAFETY: allocated by `map`/`remap` with this layout.
        unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, align)) }
    }

    /// # Safety
    /// As the mmap version.
    pub(crate) unsafe fn remap(ptr: *mut u8, old: usize, new: usize, align: usize) -> *mut u8 {
        // SAFETY: allocated by `map`/`remap` with this layout; `new` is non-zero.
        unsafe { System.realloc(ptr, Layout::from_size_align_unchecked(old, align), new) }
    }
}

pub(super) use imp::{map, remap};

/// Unmaps a mapping of `size` bytes aligned to `align`.
///
/// # Safety
/// `ptr` was made by [`map`] or [`remap`] with this size and alignment, and nothing uses
/// it any more.
pub(super) unsafe fn unmap(ptr: *mut u8, size: usize, align: usize) {
    #[cfg(not(miri))]
    {
        let _ = align;
        // SAFETY: the caller's guarantee.
        unsafe { imp::unmap(ptr, size) }
    }
    #[cfg(miri)]
    // SAFETY: the caller's guarantee.
    unsafe {
        imp::unmap_aligned(ptr, size, align)
    }
}
